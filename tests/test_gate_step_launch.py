"""benchmarks/gate_step_launch.py: its table (the timing needs a GPU's profiler)."""

from absl import flags
from absl.testing import flagsaver

from benchmarks import gate_step_launch


def test_table_has_a_row_per_shape():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  row = dict(batch=8, cache=32768, blocks=512, default=(128, 4),
             us={'0': 8.5, '32x4': 9.9})
  with flagsaver.flagsaver(launches=['0', '32x4']):
    table = gate_step_launch.markdown([row], dict(device='gpu', jax='x', date='today'))
  assert '| batch x cache (blocks) | default | 32x4 |' in table
  assert '| 8 x 32768 (512) | 8.5 | 9.9 |' in table
  assert 'default (chunk, warps): 8 x 32768: (128, 4)' in table
