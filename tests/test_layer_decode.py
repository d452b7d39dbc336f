"""benchmarks/layer_decode.py: a smoke run on the CPU at a small shape, both
layers decoding through their own path (the sparse one through its gate)."""

from absl import flags
from absl.testing import flagsaver

from benchmarks import layer_decode


def test_smoke_sparse_and_dense_layers(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(heads=4, kv_heads=2, head_dim=64, decode_chain=2, repeats=1,
                           iters=1, decode_block_k=64):
    row = layer_decode.bench(2, 512)
    table = layer_decode.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert row['kept_blocks'] == 3 and set(row['ms']) == {'sparse', 'dense'}
  assert row['block_k'] == 64
  assert row['same_selection'] == 1.0   # a CPU host: both are the XLA path
  assert row['speedup'] == row['ms']['dense'] / row['ms']['sparse']
  assert '| 2 x 512 | keep=0.35 | 3.0 of 8 | 100% |' in table


def test_kernel_list_of_a_traced_call():
  row = dict(batch=8, cache=64, block_k=64, rule='keep=0.35', kept_blocks=1, same_selection=1.0,
             speedup=1.0, ms=dict(sparse=1.0, dense=1.0),
             kernels=dict(sparse=dict(busy_us=5.0, per_step=2, longest={'decode': 4.0})))
  table = layer_decode.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert '8 x 64, sparse: 2 kernels and 5.0 us of GPU time a step' in table
  assert '`decode` 4.0' in table
