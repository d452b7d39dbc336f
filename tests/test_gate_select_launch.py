"""benchmarks/gate_select_launch.py: its table (the timing needs a GPU's profiler)."""

from absl import flags
from absl.testing import flagsaver

from benchmarks import gate_select_launch


def test_table_has_a_row_per_shape_and_rule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  row = dict(batch=8, cache=32768, blocks=512, default=(128, 8),
             us={'top_k 35%': {'0': 8.3, '32': 64.6}, 'coverage 0.5': {'0': 14.1, '32': 122.2}})
  with flagsaver.flagsaver(chunks=['0', '32']):
    table = gate_select_launch.markdown([row], dict(device='gpu', jax='x', date='today'))
  assert '| batch x cache (blocks) | rule | default | chunk 32 |' in table
  assert '| 8 x 32768 (512) | coverage 0.5 | 14.1 | 122.2 |' in table
  assert 'default (chunk, warps): 8 x 32768: (128, 8)' in table
