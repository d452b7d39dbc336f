"""A/B of the Mosaic forward kernel: this tree's against other versions', in one run.

  git show REV:pallas_kernels/sparse_attention/mosaic_gpu.py > benchmarks/base_mosaic_gpu.py
  python benchmarks/kernel_ab.py --base benchmarks/base_mosaic_gpu.py[,OTHER.py] --out DIR \
      --seqs 4096,8192,16384

The GPU drifts by more than a small kernel change gains (tokamax's own 8k time
spread 0.879-0.948 ms across four runs), so two versions are only compared
within one process: the same inputs and tables (attention.py's selection at
--sparsity, exact budgets), the kernels alone, timed in alternation over
--rounds so that drift hits all. Reports each version's median, new / base,
and how far each one's output is from the new one's (bit-identical, or the
relative error). Shape flags are attention.py's
(--tokens, --heads, --kv_heads, --head_dim, --iters).
"""

import importlib.util
import json
import os
import sys

from absl import app
from absl import flags
import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import budgets  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu  # noqa: E402

_BASE = flags.DEFINE_list('base', None, 'other versions of mosaic_gpu.py (files; each named '
                          'by its stem)', required=True)
_SPARSITY = flags.DEFINE_float('sparsity', 0.65, 'block sparsity of the tables')
_BLOCK_K = flags.DEFINE_integer('block_k', 128, 'key block')
_STAGES = flags.DEFINE_integer('stages', 2, 'K/V ring stages')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'alternating timed batches of each (median)')
_CTAS = flags.DEFINE_list('ctas', ['sm', '0'], "Config.persistent_ctas values to compare: "
                          "'sm' (the GPU's SM count: persistent) and/or integers (0: a CTA "
                          'per tile)')
flags.register_validator('ctas', lambda specs: all(s == 'sm' or s.isdigit() for s in specs),
                         "--ctas: 'sm' or non-negative integers")


def load_bases(paths, needs=('Config', 'sparse_attention_fwd'), module='mosaic_gpu.py'):
  """{stem: module} of --base, each a version of `module` (it has `needs`)."""
  modules = {}
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path) or name in modules or name == 'new':
      raise SystemExit(f'--base {path!r}: no such file, or its stem is taken')
    spec = importlib.util.spec_from_file_location(name, path)
    modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[name])
    if not all(hasattr(modules[name], a) for a in needs):
      raise SystemExit(f'--base {path!r} has no {" and ".join(needs)}: '
                       f'not a version of {module}')
  return modules


def forward(module, ctas, block_k, stages):
  sizes = bt.BlockSizes(mosaic_gpu.TILE_Q, block_k)
  config = module.Config(num_stages=stages, persistent_ctas=ctas)
  # A smoke run on the CPU goes through the GPU interpreter.
  interpret = plgpu.InterpretGPUParams() if jax.default_backend() == 'cpu' else None
  return jax.jit(lambda q, k, v, tables: module.sparse_attention_fwd(
      q, k, v, tables, None, None, block_sizes=sizes, config=config, interpret=interpret)[0])


def bench(seq, bases):
  q, k, v = attention.make_inputs(seq)
  bk = _BLOCK_K.value
  visible = budgets.visible_tiles(seq, mosaic_gpu.TILE_Q, bk, 0)
  tables = jax.jit(lambda q, k: attention.select_blocks(
      q, k, 1.0 - _SPARSITY.value, visible, bk, 'fused'))(q, k)
  row = dict(seq=seq, batch=q.shape[0], block_k=bk, stages=_STAGES.value,
             sparsity=budgets.sparsity(jax.device_get(tables.kv_count), visible), ms={},
             same={}, rel_err={}, ratio={})
  for spec in _CTAS.value:
    ctas = attention.sm_count() if spec == 'sm' else int(spec)
    versions = dict(new=mosaic_gpu, **bases)
    fns = {f'{name}_{spec}': forward(module, ctas, bk, _STAGES.value)
           for name, module in versions.items()}
    want = jax.device_get(fns[f'new_{spec}'](q, k, v, tables))
    for name in bases:
      got = jax.device_get(fns[f'{name}_{spec}'](q, k, v, tables))
      row['same'][f'{name}_{spec}'] = bool(np.array_equal(want, got))
      row['rel_err'][f'{name}_{spec}'] = attention.rel_err(got, want)
    row['ms'].update(timing.time_alternating(fns, q, k, v, tables, rounds=_ROUNDS.value,
                                             iters=attention._ITERS.value))
    for name in bases:
      row['ratio'][f'{name}_{spec}'] = row['ms'][f'new_{spec}'] / row['ms'][f'{name}_{spec}']
  print(json.dumps(row))
  return row


def markdown(rows, env, bases):
  """One line per (seq, ctas): the new version's ms, then each base's ms,
  new / base, and 'same' where its bits are the new one's, else its relative
  error against them."""
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}; sparsity {_SPARSITY.value}, "
           f'block_k {_BLOCK_K.value}, kernel alone, median of {_ROUNDS.value} alternating '
           'batches (ms; ctas sm: persistent, 0: a CTA per tile)', '',
           '| seq | ctas | new | ' + ' | '.join(f'{b} | new/{b} | bits' for b in bases)
           + ' |', '| --- ' * (3 + 3 * len(bases)) + '|']
  for r in rows:
    for s in _CTAS.value:
      bits = lambda key: 'same' if r['same'][key] else f"rel. err {r['rel_err'][key]:.1e}"
      cells = [f"{r['ms'][f'{b}_{s}']:.4f} | {r['ratio'][f'{b}_{s}']:.3f} | {bits(f'{b}_{s}')}"
               for b in bases]
      lines.append(f"| {r['seq']} | {s} | {r['ms'][f'new_{s}']:.4f} | " + ' | '.join(cells)
                   + ' |')
  return '\n'.join(lines) + '\n'


def report(stem, bench_rows, table, **env):
  """attention.write_report of bench_rows() with --base (and `env`) in its env:
  the A/B tools' common ending."""
  attention.write_report(stem, bench_rows(), table, base=_BASE.value, **env)


def main(_):
  bases = load_bases(_BASE.value)
  report('kernel_ab', lambda: [bench(int(seq), bases) for seq in attention._SEQS.value],
         lambda rows, env: markdown(rows, env, list(bases)))


if __name__ == '__main__':
  app.run(main)
