"""mosaic_gpu_decode.sparse_decode against decode.sparse_decode_reference, in the
GPU interpreter on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import decode
from pallas_kernels.sparse_attention import mosaic_gpu_decode


def _case(seed, b, hq, hkv, s, block_k, budgets, d=64):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, 1, hq, d), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (b, s, hkv, d), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (b, s, hkv, d), jnp.bfloat16)
  scores = jax.random.normal(keys[3], (b, hkv, s // block_k))
  ids, count = bt.tables_from_scores(scores, jnp.asarray(budgets, jnp.int32), s // block_k)
  return q, kc, vc, ids, count


@pytest.mark.parametrize('hq, hkv, block_k, d, splits, stages, lens', [
    (8, 2, 64, 64, 2, 2, ((512, 300), (0, 0), (511, 299))),       # GQA 4, ragged, causal
    (2, 2, 64, 64, 3, 4, ((512, 448), (200, 0), (100, 447))),      # GQA 1, a prefix past the token
    (8, 1, 64, 128, 1, 6, ((257, 512), (0, 0), (256, 511))),       # GQA 8, one split, 6 slots
    (8, 2, 128, 64, 2, 2, ((512, 300), (0, 0), (511, 299))),       # 128-key blocks
    (8, 4, 64, 64, 1, 2, ((512, 300), (0, 0), (511, 299))),        # GQA 2: 4 groups a window
    (8, 2, 64, 128, 4, 1, ((512, 300), (0, 0), (511, 299))),       # one slot, 4 splits
    (8, 2, 64, 64, 0, None, ((512, 300), (0, 0), (511, 299))),     # the defaults
])
def test_matches_the_reference(hq, hkv, block_k, d, splits, stages, lens):
  n_k = 512 // block_k
  # an empty row, every block, one block, a few; odd and even counts
  budgets = [([3, 0] * 2)[:hkv], ([n_k, 1] * 2)[:hkv]]
  q, kc, vc, ids, count = _case(0, 2, hq, hkv, 512, block_k, budgets, d)
  lens = tuple(jnp.array(x) for x in lens)
  got = mosaic_gpu_decode.sparse_decode(q, kc, vc, ids, count, *lens, block_k=block_k,
                                        num_splits=splits, num_stages=stages, interpret=True)
  want = decode.sparse_decode_reference(q, kc, vc, ids, count, *lens, block_k=block_k)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_unsorted_lists_and_scalar_lengths():
  """The kernel reads ids in any order; lengths may be scalars."""
  q, kc, vc, ids, count = _case(1, 1, 4, 1, 512, 64, [[5]])
  shuffled = ids.at[..., :5].set(ids[..., :5][..., ::-1])
  lens = (jnp.int32(500), jnp.int32(0), jnp.int32(499))
  got = mosaic_gpu_decode.sparse_decode(q, kc, vc, shuffled, count, *lens, block_k=64,
                                        num_splits=2, num_stages=2, interpret=True)
  want = decode.sparse_decode_reference(q, kc, vc, ids, count, *(x[None] for x in lens),
                                        block_k=64)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize('hq, hkv, window, per_window', [
    (16, 4, 8, 2), (8, 4, 8, 4), (16, 2, 8, 1), (32, 2, 16, 1), (12, 4, 8, 1), (4, 1, 8, 1)])
def test_q_windows_hold_each_group_where_own_rows_look(hq, hkv, window, per_window):
  q = jnp.arange(2 * hq * 3, dtype=jnp.float32).reshape(2, 1, hq, 3)
  rows, w, pw = mosaic_gpu_decode._q_windows(q, hkv)
  assert (w, pw) == (window, per_window) and rows.shape[2] == w
  # What the kernel's CTA for kv head h loads, then keeps of it.
  loaded = rows[:, jnp.arange(hkv) // pw][:, :, None]                 # [B, Hkv, P=1, W, D]
  own = mosaic_gpu_decode._own_rows(loaded, hq // hkv, pw)[:, :, 0]   # [B, Hkv, G, D]
  np.testing.assert_array_equal(own.reshape(q.shape), q)


@pytest.mark.parametrize('group, per_window, parts', [(4, 2, 8), (1, 8, 4)])
def test_merge_windows_is_the_combine_of_own_rows(group, per_window, parts):
  keys = jax.random.split(jax.random.PRNGKey(2), 2)
  b, hkv, window, d = 2, 8, 8 if group < 8 else group, 64
  out = jax.random.normal(keys[0], (b, hkv, parts, window, d), jnp.bfloat16)
  lse = jax.random.normal(keys[1], (b, hkv, parts, window)) * 3
  lse = lse.at[0, 0, 1:].set(-jnp.inf).at[1, 1].set(-jnp.inf)    # one live part; none
  got = decode.merge_windows(out, lse, group=group, per_window=per_window,
                             dtype=jnp.float32, interpret=True)
  own = mosaic_gpu_decode._own_rows
  want = decode.combine(own(out, group, per_window).astype(jnp.float32),
                        own(lse[..., None], group, per_window)[..., 0], axis=2)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert not np.asarray(got[1, 1]).any()                          # no key seen: 0


@pytest.mark.parametrize('rows, width, want', [(32, 180, 8), (12, 180, 16), (32, 3, 2), (200, 9, 1)])
def test_default_splits_are_powers_of_two(rows, width, want):
  assert mosaic_gpu_decode.default_splits(rows, width) == want


def test_default_splits_for_another_cta_count():
  # 128 or 512 CTAs over 32 rows; 512 over a list of 3
  assert [mosaic_gpu_decode.default_splits(32, w, c) for w, c in
          ((180, 128), (180, 512), (3, 512))] == [4, 16, 2]


def test_default_stages_fit():
  for bk, d in [(64, 128), (128, 128), (64, 64), (128, 64)]:
    mosaic_gpu_decode.check_config(bk, d, mosaic_gpu_decode.STAGES)
  q, kc = jnp.zeros((1, 1, 4, 128), jnp.bfloat16), jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
  assert mosaic_gpu_decode.unsupported(q, kc, 128) is None
  assert 'needs' in mosaic_gpu_decode.unsupported(q, kc, 128, num_stages=4)


@pytest.mark.parametrize('count, splits, want', [
    (5, 3, [(0, 1), (1, 2), (3, 2)]),
    (2, 4, [(0, 0), (0, 1), (1, 0), (1, 1)]),
    (90, 8, [(0, 11), (11, 11), (22, 11), (33, 12), (45, 11), (56, 11), (67, 11), (78, 12)]),
    (0, 2, [(0, 0), (0, 0)]),
])
def test_slices_cover_each_list_once(count, splits, want):
  got = [tuple(int(x) for x in mosaic_gpu_decode._slice_of(jnp.int32(count), s, splits))
         for s in range(splits)]
  assert got == want


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_stages=0), 'num_stages=0 must be >= 1'),
    (dict(num_stages=8), 'num_stages=8 needs'),
    (dict(block_k=32), 'block_k=32'),
])
def test_bad_options_are_named(kwargs, match):
  config = dict(block_k=64, head_dim=128, num_stages=2) | kwargs
  with pytest.raises(ValueError, match=match):
    mosaic_gpu_decode.check_config(**config)


def test_more_than_one_new_token_is_refused():
  q = jnp.zeros((1, 2, 2, 64), jnp.bfloat16)
  kc = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
  ids, count = jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1), jnp.int32)
  with pytest.raises(ValueError, match='one new token'):
    mosaic_gpu_decode.sparse_decode(q, kc, kc, ids, count, jnp.array([128]), jnp.array([0]),
                                    jnp.array([126]), block_k=64, interpret=True)
