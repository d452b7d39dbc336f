"""A/B of the Mosaic backward: this tree's against other versions', in one run,
inside the whole forward + backward step (at --sparsity, 0.65 by default).

  git show REV:pallas_kernels/sparse_attention/mosaic_gpu_backward.py > /tmp/base_bwd.py
  python benchmarks/backward_ab.py --base /tmp/base_bwd.py --block_k 64 --rounds 15 \\
      --out DIR --seqs 4096,8192,16384 [--orders blocks_ascending]

As kernel_ab.py does for the forward (whose flags it shares: --base, --sparsity,
--block_k, --rounds, and --ctas, of which the first is the forward's): one
process, the same inputs, every step timed in alternation, cuDNN's dense step
among them for the ratio. A step is attention.py's fused selection at
--sparsity, this tree's Mosaic forward, and the version's backward behind a
custom_vjp of its own, applied to one fixed random cotangent (attention.py
--cotangents random). Reports each step's median ms, its ratio to cuDNN's,
new / base, and its gradients' relative error against the new version's.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import kernel_ab  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_backward  # noqa: E402

_ORDERS = flags.DEFINE_list('orders', [], 'more dk/dv launch orders to time this tree\'s '
                            'backward with (mosaic_gpu_backward.DKV_ORDERS): keys new_<order>')
_BASE_LENGTHS = flags.DEFINE_enum('base_lengths', 'arrays', ['arrays', 'static'],
                                  'how the base versions get kv_len and prefix_len: [B] '
                                  'arrays (versions before 2026-11-30 took no None), or '
                                  'None as this tree\'s backward does')


def _interpret():
  """A smoke run on the CPU goes through the GPU interpreter."""
  return jax.default_backend() == 'cpu'


def attention_with(backward, config, lengths='static'):
  """(q, k, v, tables) -> out: this tree's forward, `backward` behind its own
  custom_vjp (no jit cache shared with another version's)."""
  sizes = bt.BlockSizes(mosaic_gpu.TILE_Q, kernel_ab._BLOCK_K.value)
  spec = kernel_ab._CTAS.value[0]
  ctas = attention.sm_count() if spec == 'sm' else int(spec)
  fwd_config = mosaic_gpu.Config(2, mosaic_gpu_backward.Config(), ctas)
  interpret = _interpret()

  def forward(q, k, v, tables):
    return mosaic_gpu.sparse_attention_fwd(
        q, k, v, tables, None, None, block_sizes=sizes, config=fwd_config,
        interpret=plgpu.InterpretGPUParams() if interpret else None)

  @jax.custom_vjp
  def attend(q, k, v, tables):
    return forward(q, k, v, tables)[0]

  def attend_fwd(q, k, v, tables):
    out, lse = forward(q, k, v, tables)
    return out, (q, k, v, tables, out, lse)

  def attend_bwd(res, d_out):
    q, k, v, tables, out, lse = res
    lens = (None, None)
    if lengths == 'arrays':
      lens = (jnp.full(q.shape[:1], k.shape[1], jnp.int32), jnp.zeros(q.shape[:1], jnp.int32))
    grads = backward(q, k, v, tables, *lens, out, lse, d_out, block_sizes=sizes,
                     config=config, interpret=interpret)
    return (*grads, None)

  attend.defvjp(attend_fwd, attend_bwd)
  return attend


def bench(seq, bases):
  q, k, v = attention.make_inputs(seq)
  d_out = attention.random_cotangent(q)
  select = attention.sparse_fn(1.0 - kernel_ab._SPARSITY.value, seq, 0,
                               kernel_ab._BLOCK_K.value, 2)[1]
  versions = {'new': attention_with(mosaic_gpu_backward.backward, mosaic_gpu_backward.Config())}
  for order in _ORDERS.value:
    versions[f'new_{order}'] = attention_with(
        mosaic_gpu_backward.backward, mosaic_gpu_backward.Config(dkv_order=order))
  for name, module in bases.items():
    versions[name] = attention_with(module.backward, module.Config(), _BASE_LENGTHS.value)
  # jitted (q, k, v, d_out) -> (dq, dk, dv), selection inside.
  fns = {name: attention.grad_fn(lambda q, k, v, a=attend: a(q, k, v, select(q, k)), 'random')
         for name, attend in versions.items()}
  if not _interpret():
    fns['cudnn'] = attention.grad_fn(attention.dense_baselines()['cudnn'], 'random')
  want = [np.asarray(g, np.float32) for g in fns['new'](q, k, v, d_out)]
  row = dict(seq=seq, batch=q.shape[0], block_k=kernel_ab._BLOCK_K.value, rel_err={})
  for name in versions:
    got = fns[name](q, k, v, d_out)
    row['rel_err'][name] = {x: attention.rel_err(g, w) for x, g, w in zip('qkv', got, want)}
  row['ms'] = timing.time_alternating(fns, q, k, v, d_out, rounds=kernel_ab._ROUNDS.value,
                                      iters=attention._ITERS.value)
  row['over_new'] = {n: ms / row['ms']['new'] for n, ms in row['ms'].items()}
  if 'cudnn' in row['ms']:
    row['ratio'] = {n: ms / row['ms']['cudnn'] for n, ms in row['ms'].items()}
  print(json.dumps(row))
  return row


def markdown(rows, env):
  names = [n for n in rows[0]['ms'] if n != 'cudnn']
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}; fwd + bwd step at sparsity "
           f"{kernel_ab._SPARSITY.value}, block_k {kernel_ab._BLOCK_K.value}, random cotangent, "
           f"median of {kernel_ab._ROUNDS.value} alternating batches: ms (ratio to cuDNN's "
           "step; time over new's; largest gradient rel. err against new's)", '',
           '| seq | cudnn | ' + ' | '.join(names) + ' |', '| --- ' * (2 + len(names)) + '|']
  for r in rows:
    ratio = r.get('ratio', {})
    cells = [f"{r['ms'][n]:.4f} ({ratio.get(n, float('nan')):.3f}x; {r['over_new'][n]:.3f}; "
             f"{max(r['rel_err'][n].values()):.1e})" for n in names]
    lines.append(f"| {r['seq']} | {r['ms'].get('cudnn', float('nan')):.4f} | "
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(_):
  bases = kernel_ab.load_bases(kernel_ab._BASE.value, ('Config', 'backward'),
                               'mosaic_gpu_backward.py')
  kernel_ab.report('backward_ab',
                   lambda: [bench(int(seq), bases) for seq in attention._SEQS.value], markdown)


if __name__ == '__main__':
  app.run(main)
