"""Block-sparse attention: tables round-trip, and the reference itself run
through the shared suite (sparse_attention_base.py) so the suite's cases are
checked against the independent dense formula. Kernels have their own files
(test_sparse_triton.py, ...).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import (
    BlockSizes, block_mask_from_tables, build_block_tables,
    reference_sparse_attention)
from pallas_kernels.sparse_attention import block_tables as bt
from tests.pallas_kernels.sparse_attention_base import SparseAttentionTestBase

def _random_mask(seed, shape, p=0.5):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), p, shape)


# ---------------------------------------------------------------- tables ----

def test_tables_round_trip_and_order():
  mask = _random_mask(0, (2, 3, 5, 7)).at[0, 0, 0].set(False)  # an empty row
  t = jax.jit(build_block_tables)(mask)
  assert t.kv_ids.dtype == t.kv_count.dtype == jnp.int32
  assert t.kv_ids.shape == (2, 3, 5, 7) and t.q_ids.shape == (2, 3, 7, 5)
  np.testing.assert_array_equal(block_mask_from_tables(t.kv_ids, t.kv_count, 7), mask)
  np.testing.assert_array_equal(
      block_mask_from_tables(t.q_ids, t.q_count, 5), jnp.swapaxes(mask, -1, -2))
  ids, count = np.asarray(t.kv_ids), np.asarray(t.kv_count)
  for row, n in zip(ids.reshape(-1, 7), count.reshape(-1)):
    assert np.all(np.diff(row[:n]) > 0)                      # ascending
    assert np.all(row[n:] == (row[n - 1] if n else 0))       # padding
  assert count[0, 0, 0] == 0 and np.all(ids[0, 0, 0] == 0)


def test_tables_static_width():
  mask = jnp.zeros((1, 1, 4, 8), bool).at[0, 0, :, 2].set(True).at[0, 0, 1, 6].set(True)
  t = build_block_tables(mask, max_k=2)
  np.testing.assert_array_equal(t.kv_ids[0, 0], [[2, 2], [2, 6], [2, 2], [2, 2]])
  np.testing.assert_array_equal(t.kv_count[0, 0], [1, 2, 1, 1])


# ------------------------------------------------- tables from scores ----

def _tables_from_scores_numpy(scores, budget, max_k):
  """Brute force: per row the min(budget, max_k) best (higher score, then lower
  index), less the -inf ones, ascending; padded with the last id (0 if none)."""
  scores = np.asarray(scores, np.float64)
  lead, n = scores.shape[:-1], scores.shape[-1]
  ids = np.zeros((*lead, max_k), np.int32)
  count = np.zeros(lead, np.int32)
  for r in np.ndindex(*lead):
    s = scores[r]
    best = sorted(range(n), key=lambda i: (-s[i], i))[:max(0, min(int(budget[r]), max_k))]
    kept = sorted(i for i in best if s[i] > -np.inf)
    count[r] = len(kept)
    ids[r] = (kept + [kept[-1]] * (max_k - len(kept))) if kept else 0
  return ids, count


def _random_scores(rng, shape, *, special=False):
  """Integer-valued (many ties) with -inf and +inf entries and an all -inf row;
  special: NaNs of both signs and -0.0 too (orders that only top_k defines)."""
  s = rng.integers(-3, 4, size=shape).astype(np.float32)
  u = rng.random(shape)
  s[u < 0.15] = -np.inf
  s[u > 0.9] = np.inf
  s.reshape(-1, shape[-1])[0] = -np.inf
  if special:
    s[rng.random(shape) < 0.1] = -0.0
    s[rng.random(shape) < 0.05] = np.nan
    s[rng.random(shape) < 0.05] = -np.nan
  return s


def _random_budgets(rng, shape, n_k):
  b = rng.integers(-1, n_k + 3, size=shape[:-1]).astype(np.int32)
  b.reshape(-1)[:2] = (0, n_k + 2)[:b.size]            # none, more than there are
  return b


_SCORE_SHAPES = [(3, 1), (2, 3, 5), (3, 33), (2, 2, 4, 64), (8, 128)]


@pytest.mark.parametrize('shape', _SCORE_SHAPES, ids=str)
def test_tables_from_scores_matches_brute_force(shape):
  rng = np.random.default_rng(sum(shape))
  n_k = shape[-1]
  scores = _random_scores(rng, shape)
  budget = _random_budgets(rng, shape, n_k)
  for max_k in sorted({1, max(1, n_k // 3), n_k}):
    want = _tables_from_scores_numpy(scores, budget, max_k)
    for method in bt.SELECT_METHODS:
      got = jax.jit(bt.tables_from_scores, static_argnums=(2, 3))(
          jnp.asarray(scores), jnp.asarray(budget), max_k, method)
      assert got[0].dtype == got[1].dtype == jnp.int32
      np.testing.assert_array_equal(got[0], want[0], err_msg=f'{method} ids, {max_k=}')
      np.testing.assert_array_equal(got[1], want[1], err_msg=f'{method} count, {max_k=}')


@pytest.mark.parametrize('shape', _SCORE_SHAPES + [(4, 3, 256)], ids=str)
def test_tables_from_scores_methods_agree(shape):
  """rank == pallas == top_k exactly, NaN and -0.0 included, f32 and bf16 scores
  (pallas at one max_k: the interpreter's compiles are the CI's time)."""
  rng = np.random.default_rng(1 + sum(shape))
  n_k = shape[-1]
  budget = jnp.asarray(_random_budgets(rng, shape, n_k))
  for dtype in (jnp.float32, jnp.bfloat16):
    scores = jnp.asarray(_random_scores(rng, shape, special=True), dtype)
    middle = max(1, (n_k * 35) // 100)
    for max_k in sorted({1, middle, n_k}):
      want = bt.tables_from_scores(scores, budget, max_k, method='top_k')
      for method in ('rank', 'pallas') if max_k == middle else ('rank',):
        got = bt.tables_from_scores(scores, budget, max_k, method=method)
        for g, w in zip(got, want):
          np.testing.assert_array_equal(g, w, err_msg=f'{method} {dtype=} {max_k=}')


def test_tables_from_scores_cases():
  inf = np.inf
  scores = jnp.array([[1., inf, 2., inf, 0.],           # forced blocks first
                      [-inf, -inf, -inf, -inf, -inf],   # nothing to keep
                      [3., 3., 3., 3., 3.],             # ties: lower index
                      [-inf, 5., -inf, 1., -inf],       # budget > candidates
                      [4., 3., 2., 1., 0.]])            # budget 0
  budget = jnp.array([1, 3, 2, 5, 0])
  for method in bt.SELECT_METHODS:
    ids, count = bt.tables_from_scores(scores, budget, 3, method=method)
    np.testing.assert_array_equal(count, [1, 0, 2, 2, 0], err_msg=method)
    np.testing.assert_array_equal(ids, [[1, 1, 1], [0, 0, 0], [0, 1, 1], [1, 3, 3],
                                        [0, 0, 0]], err_msg=method)
  with pytest.raises(ValueError, match='method'):
    bt.tables_from_scores(scores, budget, 3, method='sort')


@pytest.mark.parametrize('ids, count, limit, first_masked, want_first', [
    ([0, 2, 3, 7, 7], 4, 3, False, 2),   # ids below 3: 0, 2; then 3 and 7 masked
    ([0, 2, 3, 7, 7], 4, 4, True, 3),    # a masked run first, as dk/dv's
    ([0, 2, 3, 7, 7], 4, 99, False, 4),  # every listed block in the first run
    ([5, 6, 6], 2, 1, False, 0),         # none
    ([1, 1], 0, 9, True, 0),             # an empty list runs no step
])
def test_split_loop_runs_each_step_once_in_its_kind(ids, count, limit, first_masked,
                                                    want_first):
  """The Mosaic kernels' loop (block_tables.split_loop), run as plain jnp: steps
  0..count-1 in order, the first run while its predicate holds of the next id,
  the other kind after; id_at is read one step ahead (the clamped count-th)."""
  table = jnp.array(ids, jnp.int32)
  id_at = lambda j: table[jnp.minimum(j, len(ids) - 1)]

  def step(j, carry, masked):
    seen, kinds = carry
    return seen.at[j].add(1), kinds.at[j].set(int(masked))

  zeros = jnp.zeros(len(ids), jnp.int32)
  seen, kinds = bt.split_loop(step, (zeros, zeros - 1), jnp.int32(count), id_at,
                              lambda block: block < limit, first_masked)
  np.testing.assert_array_equal(seen, [1] * count + [0] * (len(ids) - count))
  want = [int(first_masked)] * want_first + [int(not first_masked)] * (count - want_first)
  np.testing.assert_array_equal(kinds[:count], want)


# ------------------------------------------------------------- reference ----

def _reference_kernel(q, k, v, tables, kv_len, prefix_len, *, block_sizes):
  """The reference behind the base's kernel contract (mask rebuilt from tables)."""
  n_k = k.shape[1] // block_sizes.block_k
  mask = block_mask_from_tables(tables.kv_ids, tables.kv_count, n_k)
  return reference_sparse_attention(q, k, v, mask, kv_len, prefix_len,
                                    block_sizes=block_sizes)


class TestReferenceThroughBase(SparseAttentionTestBase):
  """Checks the shared cases themselves: tables -> mask round trip, the dense
  formula on all-blocks cases, keyless rows exactly 0. Cheap (plain jnp)."""
  kernel = staticmethod(_reference_kernel)
  block_sizes = (BlockSizes(32, 32), BlockSizes(16, 32))
  head_dims = (32, 16)
  supports_grad = False
