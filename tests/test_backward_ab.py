"""benchmarks/backward_ab.py: a smoke run on the CPU (the GPU interpreter, one
128-row tile) of this tree's backward against a copy of itself, the copy given
[B] length arrays, the other None: the same gradients either way."""

import shutil

from absl import flags
from absl.testing import flagsaver

from benchmarks import backward_ab, kernel_ab
from pallas_kernels.sparse_attention import mosaic_gpu_backward


def test_smoke_against_a_copy_of_itself(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  shutil.copy(mosaic_gpu_backward.__file__, tmp_path / 'copy.py')
  with flagsaver.flagsaver(tokens=128, heads=2, kv_heads=1, head_dim=64, block_k=64,
                           rounds=1, iters=1, ctas=['0'], base_lengths='arrays'):
    bases = kernel_ab.load_bases([str(tmp_path / 'copy.py')], ('Config', 'backward'),
                                 'mosaic_gpu_backward.py')
    row = backward_ab.bench(128, bases)
    table = backward_ab.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert set(row['ms']) == {'new', 'copy'}       # no cuDNN on the CPU
  assert max(row['rel_err']['copy'].values()) == 0.0
  assert row['over_new']['new'] == 1.0
  assert '| 128 |' in table
