"""benchmarks/attention.py --alternate_rounds: the dense baselines and ours timed in
alternation, each ratio over the fastest dense path of the same batches."""

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp

from benchmarks import attention


def test_alternating_ratios_are_over_the_fastest_dense_path():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  x = jnp.ones((256, 256), jnp.float32)
  slow = jax.jit(lambda q, k, v: q @ k @ v @ q @ k @ v @ q @ k)
  fast = jax.jit(lambda q, k, v: q + k + v)
  ours = jax.jit(lambda q, k, v: q @ k)
  res = {}
  with flagsaver.flagsaver(alternate_rounds=3, iters=2):
    attention.alternate(res, {'slow': slow, 'fast': fast}, {'ours': ours}, x, x, x)
    lines = attention.forward_markdown([dict(seq=256, prefix=0, block_k=128, stages=2, ms={},
                                             best_dense_ms=1.0, tflops={}, **res)])
  assert set(res['alternating']) == {'slow', 'fast', 'ours'}
  best = min(res['alternating']['slow'], res['alternating']['fast'])
  assert min(res['alternating_ratio']['slow'], res['alternating_ratio']['fast']) == 1.0
  assert res['alternating_ratio']['ours'] == res['alternating']['ours'] / best
  row = next(l for l in lines if l.startswith('| 256 | 128 |'))
  assert f"{res['alternating_ratio']['ours']:.3f}x" in row
