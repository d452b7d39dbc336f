"""The learned gate's decode selection kernel (gate_select.decode_tables) alone,
under several chunk sizes: what gate_select.launch picks from.

  python benchmarks/gate_select_launch.py --out DIR [--decode 8x32768,1x32768] \
      [--chunks 0,32,64,128]

Random gate logits [B, Hkv, G, nK] (attention.py's --heads / --kv_heads,
block_k 64) and two rules: top-k keeping 35% of the blocks (layer_decode.py's
default) and coverage 0.5 (the recipes' kind). One jitted loop of --calls selections, each at
the next position (so none is hoisted); the kernel's median time from the
JAX profiler (CUPTI). Chunk 0 is launch's default. Writes
gate_select_launch.{json,md}.
"""

import os
import statistics
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import decode_timeline  # noqa: E402
from pallas_kernels.sparse_attention import gate_select  # noqa: E402

_CHUNKS = flags.DEFINE_list('chunks', ['0', '32', '64', '128'],
                            'chunk sizes (0: gate_select.launch\'s)')
_CALLS = flags.DEFINE_integer('calls', 20, 'selections in the traced loop')
BLOCK_K = 64
RULES = {'top_k 35%': lambda n_k: dict(threshold=0.0, top_k=attention.decode_budget(0.65, n_k) - 2,
                                       coverage=0.0),
         'coverage 0.5': lambda n_k: dict(threshold=0.0, top_k=0, coverage=0.5)}


def kernel_us(batch, n_k, rule, chunk):
  """Median GPU time (us) of the selection kernel, one call at a time."""
  hkv = attention._KV_HEADS.value
  group = attention._HEADS.value // hkv
  logits = jax.random.normal(jax.random.key(0), (batch, hkv, group, n_k), jnp.float32) * 2
  start = jnp.full((batch,), n_k * BLOCK_K - _CALLS.value - 1, jnp.int32)
  max_k = min(n_k, rule['top_k'] + 3) if rule['top_k'] else n_k

  @jax.jit
  def run(logits, start):
    def one(i, acc):
      ids, count = gate_select.decode_tables(
          logits, start + i, start + i + 1, jnp.zeros_like(start), rule['threshold'],
          rule['coverage'], causal=True, block_k=BLOCK_K, num_new=1, top_k=rule['top_k'],
          use_coverage=rule['coverage'] > 0, max_k=max_k, chunk=chunk or None)
      return acc + count.sum() + ids[..., 0].sum()
    return jax.lax.fori_loop(0, _CALLS.value, one, 0)

  return median_kernel_us(run, logits, start)


def median_kernel_us(run, *args):
  """Median GPU time (us) of the Pallas kernel (`_kernel`) that the jitted
  run(*args) launches --calls times, from one call traced after a first."""
  jax.block_until_ready(run(*args))   # compile
  events = decode_timeline.profiled_kernels(lambda: jax.block_until_ready(run(*args)))
  times = [duration for _, duration, name in events if name == '_kernel']
  if len(times) != _CALLS.value:
    raise ValueError(f'traced {len(times)} kernels named _kernel, want {_CALLS.value}')
  return statistics.median(times) / 1e3


def defaults_line(rows):
  """The markdown line naming each row's default launch."""
  return '\ndefault (chunk, warps): ' + ', '.join(
      f"{r['batch']} x {r['cache']}: {tuple(r['default'])}" for r in rows)


def bench(batch, length):
  n_k = length // BLOCK_K
  hkv = attention._KV_HEADS.value
  row = dict(batch=batch, cache=length, blocks=n_k,
             default=gate_select.launch(batch * hkv, n_k), us={})
  for name, rule in RULES.items():
    row['us'][name] = {c: kernel_us(batch, n_k, rule(n_k), int(c)) for c in _CHUNKS.value}
  print(row)
  return row


def markdown(rows, env):
  chunks = _CHUNKS.value
  head = ' | '.join('default' if c == '0' else f'chunk {c}' for c in chunks)
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: the learned gate's decode "
           "selection kernel alone (gate_select.decode_tables), us a call, by chunk", '',
           f'| batch x cache (blocks) | rule | {head} |',
           '| --- | --- |' + ' --- |' * len(chunks)]
  for r in rows:
    for name, us in r['us'].items():
      cells = ' | '.join(f'{us[c]:.1f}' for c in chunks)
      lines.append(f"| {r['batch']} x {r['cache']} ({r['blocks']}) | {name} | {cells} |")
  lines.append(defaults_line(rows))
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('gate_select_launch',
                         [bench(*shape) for shape in attention.decode_shapes()], markdown)


if __name__ == '__main__':
  app.run(main)
