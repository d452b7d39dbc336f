"""benchmarks/decode_ab.py: a smoke run on the CPU (the GPU interpreter) of this
tree's decode kernel against a copy of itself, after a second selection
method and after the `ranked` one at another launch shape, and through a
kernel that selects its blocks itself (--selecting): the same output."""

import shutil

from absl import flags
from absl.testing import flagsaver

from benchmarks import decode_ab, kernel_ab
from pallas_kernels.sparse_attention import mosaic_gpu_decode


# A selecting kernel for the smoke run: the `ranked` selection, then this tree's
# kernel, behind the signature --selecting files have.
SELECTING = """
from benchmarks import attention
from pallas_kernels.sparse_attention import mosaic_gpu_decode

def sparse_decode(q, k, v, pooled, *lens, budget, block_k, interpret):
  ids, count = attention.decode_tables(q, pooled, budget, 'ranked')
  return mosaic_gpu_decode.sparse_decode(q, k, v, ids, count, *lens, block_k=block_k,
                                         interpret=interpret)
"""


def test_smoke_against_a_copy_of_itself(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  shutil.copy(mosaic_gpu_decode.__file__, tmp_path / 'copy.py')
  with flagsaver.flagsaver(heads=8, kv_heads=2, head_dim=64, rounds=1, iters=1,
                           repeats=1, decode_chain=1, select_method=['top_k', 'ranked'],
                           head_major=False, ranked_launch=['8x4'], decode_block_k=64):
    bases = kernel_ab.load_bases([str(tmp_path / 'copy.py')], ('sparse_decode',),
                                 'mosaic_gpu_decode.py')
    (tmp_path / 'sel.py').write_text(SELECTING)
    selecting = kernel_ab.load_bases([str(tmp_path / 'sel.py')], ('sparse_decode',), 'x')
    row = decode_ab.bench(2, 256, bases, selecting)
    table = decode_ab.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert set(row['ms']) == set(row['chain_ms']) == {'new', 'copy', 'new_top_k',
                                                    'new_ranked_c8w4', 'selecting_sel'}
  assert row['select'] == 'ranked'   # decode_select_methods: `ranked` first
  assert row['block_k'] == 64 and 'blocks of 64 keys' in table
  assert row['rel_err']['copy'] == row['rel_err']['new_ranked_c8w4'] == 0.0
  assert row['rel_err']['selecting_sel'] == 0.0
  assert row['rel_err']['new_top_k'] <= 1e-6
  assert row['ms_over_new']['new'] == 1.0
  assert '| 2 x 256 | copy' in table
