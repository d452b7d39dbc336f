"""The learned gate's decode-step kernel (gate_step.decode_logits) alone, under
several launch shapes: what gate_step.launch picks from.

  python benchmarks/gate_step_launch.py --out DIR [--decode 8x32768,1x32768] \
      [--launches 0,16x4,32x4,64x4,128x4,128x8]

Random inputs at attention.py's shape (--heads / --kv_heads / --head_dim, gate_dim
64, block_k 64): one new token a row, its block's statistics folded and its
gate key re-projected, its logits against every block. One jitted loop of
--calls steps, each at the next position (so none is hoisted); the kernel's
median time from the JAX profiler (CUPTI). A launch is CHUNKxWARPS; 0 is
launch's default. Writes gate_step_launch.{json,md}.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import gate_select_launch  # noqa: E402
from flashmm_jax.models import layers  # noqa: E402
from pallas_kernels.sparse_attention import gate_step  # noqa: E402

_LAUNCHES = flags.DEFINE_list('launches', ['0', '16x4', '32x4', '64x4', '128x4', '128x8'],
                              'CHUNKxWARPS launch shapes (0: gate_step.launch\'s)')
_CALLS = gate_select_launch._CALLS   # --calls: steps in the traced loop
BLOCK_K, GATE_DIM = 64, 64


def inputs(batch, n_k):
  """decode_logits' arguments after q_offset: random, the projections scaled as
  the gate's initialiser would."""
  hkv, d = attention._KV_HEADS.value, attention._HEAD_DIM.value
  group = attention._HEADS.value // hkv
  ks = jax.random.split(jax.random.key(0), 8)
  normal = lambda i, shape, scale=1.0: jax.random.normal(ks[i], shape, jnp.float32) * scale
  return dict(q=normal(0, (batch, hkv, group, d)).astype(jnp.bfloat16),
              k=normal(1, (batch, hkv, d)).astype(jnp.bfloat16),
              stats=tuple(normal(2 + i, (batch, n_k, hkv, d)) for i in range(3)),
              gate_key=normal(5, (batch, hkv, n_k, GATE_DIM)),
              q_proj_t=normal(6, (hkv, group, GATE_DIM, d), d ** -0.5).astype(jnp.bfloat16),
              k_proj_t=normal(7, (hkv, GATE_DIM, 3 * d), (3 * d) ** -0.5).astype(jnp.bfloat16))


def kernel_us(batch, n_k, launch):
  """Median GPU time (us) of the step kernel under launch 'CHUNKxWARPS' ('0': default)."""
  chunk, warps = (None, None) if launch == '0' else map(int, launch.split('x'))
  x = inputs(batch, n_k)
  start = jnp.full((batch,), n_k * BLOCK_K - _CALLS.value - 1, jnp.int32)
  freq = layers.rope_frequencies(GATE_DIM, 10000.0)

  @jax.jit
  def run(x, start):
    def one(i, carry):
      stats, gate_key, acc = carry
      logits, stats, gate_key = gate_step.decode_logits(
          x['q'], x['k'], stats, gate_key, x['q_proj_t'], x['k_proj_t'], start + i,
          start + i + 1, freq, block_k=BLOCK_K, chunk=chunk, num_warps=warps)
      return stats, gate_key, acc + logits[:, :, 0, -1].sum()
    return jax.lax.fori_loop(0, _CALLS.value, one, (x['stats'], x['gate_key'], 0.0))

  return gate_select_launch.median_kernel_us(run, x, start)


def bench(batch, length):
  n_k = length // BLOCK_K
  row = dict(batch=batch, cache=length, blocks=n_k,
             default=gate_step.launch(batch * attention._KV_HEADS.value, n_k),
             us={launch: kernel_us(batch, n_k, launch) for launch in _LAUNCHES.value})
  print(row)
  return row


def markdown(rows, env):
  launches = _LAUNCHES.value
  head = ' | '.join('default' if l == '0' else l for l in launches)
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: the learned gate's decode "
           "step kernel alone (gate_step.decode_logits), us a call, by launch (CHUNKxWARPS)", '',
           f'| batch x cache (blocks) | {head} |', '| --- |' + ' --- |' * len(launches)]
  for r in rows:
    cells = ' | '.join(f"{r['us'][l]:.1f}" for l in launches)
    lines.append(f"| {r['batch']} x {r['cache']} ({r['blocks']}) | {cells} |")
  lines.append(gate_select_launch.defaults_line(rows))
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('gate_step_launch',
                         [bench(*shape) for shape in attention.decode_shapes()], markdown)


if __name__ == '__main__':
  app.run(main)
