"""mosaic_gpu.sparse_decode (the Mosaic forward run as split-K decode) against
decode.sparse_decode_reference, in the GPU interpreter on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import decode
from pallas_kernels.sparse_attention import mosaic_gpu


def _case(seed, b, hq, hkv, s, block_k, budgets):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, 1, hq, 64), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (b, s, hkv, 64), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (b, s, hkv, 64), jnp.bfloat16)
  scores = jax.random.normal(keys[3], (b, hkv, s // block_k))
  ids, count = bt.tables_from_scores(scores, jnp.asarray(budgets, jnp.int32), s // block_k)
  return q, kc, vc, ids, count


@pytest.mark.parametrize('hq, hkv, splits, stages, lens', [
    (8, 2, 2, 2, ((512, 300), (0, 0), (511, 299))),      # GQA 4, ragged, causal
    (2, 2, 3, 2, ((512, 448), (200, 0), (100, 447))),     # GQA 1, a prefix past the token
    (8, 1, 1, 2, ((257, 512), (0, 0), (256, 511))),       # GQA 8, one split
    (8, 2, 2, 6, ((512, 300), (0, 0), (511, 299))),       # more slots than a split's blocks
])
def test_matches_the_reference(hq, hkv, splits, stages, lens):
  budgets = [[3, 0][:hkv], [8, 1][:hkv]]              # an empty row, all blocks, one block
  q, kc, vc, ids, count = _case(0, 2, hq, hkv, 512, 64, budgets)
  lens = tuple(jnp.array(x) for x in lens)
  got = mosaic_gpu.sparse_decode(q, kc, vc, ids, count, *lens, block_k=64,
                                 num_splits=splits, interpret=True,
                                 config=mosaic_gpu.Config(num_stages=stages))
  want = decode.sparse_decode_reference(q, kc, vc, ids, count, *lens, block_k=64)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_split_tables_cover_each_list_once():
  ids = jnp.array([[[0, 2, 3, 5, 7, 7, 7]]])
  got_ids, got_counts = mosaic_gpu.split_tables(ids, jnp.array([[5]]), 3)
  assert got_counts.tolist() == [[[2, 2, 1]]]
  lists = [got_ids[0, 0, i, :c].tolist() for i, c in enumerate(got_counts[0, 0].tolist())]
  assert lists == [[0, 2], [3, 5], [7]]


def test_more_than_one_new_token_is_refused():
  q = jnp.zeros((1, 2, 2, 64), jnp.bfloat16)
  kc = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  ids, count = jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1), jnp.int32)
  with pytest.raises(ValueError, match='one new token'):
    mosaic_gpu.sparse_decode(q, kc, kc, ids, count, jnp.array([128]), jnp.array([0]),
                             jnp.array([126]), block_k=64, interpret=True)
