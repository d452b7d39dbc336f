"""benchmarks/decode_timeline.py's reading of kernel records: made-up calls of a
two-step chain (three kernels a step), and a real profile on the CPU, which
has no GPU streams."""

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import pytest

from benchmarks import attention
from benchmarks import decode_timeline


def _call(start):
  """One traced call: two steps of select (8 us), decode (47 us), merge (2 us),
  1 us before each decode, back to back otherwise (ns)."""
  events, t = [], start
  for _ in range(2):
    for name, duration, gap in (('select', 8000, 0), ('decode', 47000, 1000),
                                ('merge', 2000, 0)):
      t += gap
      events.append((t, duration, name))
      t += duration
  return events


def test_summary_of_two_calls():
  calls = decode_timeline.per_call(_call(0) + _call(500_000), 2)
  s = decode_timeline.summarize(calls, chain=2)
  assert s['kernels']['decode'] == dict(per_step=1.0, us=47.0, gap_us=1.0)
  assert s['kernels']['merge'] == dict(per_step=1.0, us=2.0, gap_us=0.0)
  assert s['kernels']['select']['gap_us'] == 0.0   # the second step's, after a merge
  assert s['busy_us'] == 57.0 and s['span_us'] == 58.0
  row = dict(batch=8, cache=64, block_k=64, paths={'ours': dict(s, wall_us=60.0)})
  table = decode_timeline.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert '| 8 x 64 | ours | `decode` | 1 | 47.00 | 1.00 |' in table
  assert '57.0 / 58.0 / 60.0' in table
  assert 'blocks of 64 keys' in table


def test_calls_of_unequal_kernels_are_refused():
  with pytest.raises(ValueError, match='do not divide into 2'):
    decode_timeline.per_call(_call(0)[:-1], 2)


def test_a_cpu_profile_has_no_gpu_kernels(tmp_path):
  with jax.profiler.trace(str(tmp_path)):
    jax.block_until_ready(jax.jit(jnp.sin)(jnp.ones(8)))
  assert decode_timeline.gpu_kernels(str(tmp_path)) == []


def test_decode_shapes_parse_the_decode_flag():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(decode=['2x256', '8x32768']):
    assert attention.decode_shapes() == [(2, 256), (8, 32768)]
