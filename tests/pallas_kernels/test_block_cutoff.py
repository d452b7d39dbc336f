"""block_cutoff.py: the sort-free block choice of sparse_decode_scored against
its sort-based reference, and the relative cutoff against the gate's rule."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from flashmm_jax.ops import sparse_gate
from pallas_kernels.sparse_attention import block_cutoff as bc

BLOCK_K = 16


def _rows(rng, n, kind):
  """Scores [2, 3, n]: 'normal', 'ties' (integers -2..2) or 'special' (normal with
  -inf, +inf and NaN mixed in)."""
  shape = (2, 3, n)
  if kind == 'ties':
    return rng.integers(-2, 3, shape).astype(np.float32)
  scores = rng.standard_normal(shape).astype(np.float32)
  if kind == 'special':
    for value in (-np.inf, np.inf, np.nan):
      scores[rng.random(shape) < 0.15] = value
  return scores


def _kept_by_kernel_code(scores, cutoff, kv_len, q_offset, rule):
  """kept_blocks as the kernel runs it, one row at a time, vmapped over B, Hkv."""
  row = lambda s, c, n, o: bc.kept_blocks(s, c, n, o, block_k=BLOCK_K, rule=rule)
  per_head = jax.vmap(row, (0, 0, None, None))
  return jax.vmap(per_head)(scores, cutoff, kv_len, q_offset)


@pytest.mark.parametrize('kind', ['normal', 'ties', 'special'])
@pytest.mark.parametrize('n', [1, 13, 64])
def test_top_k_matches_the_sort(kind, n):
  rng = np.random.default_rng(n)
  for _ in range(4):
    scores = jnp.asarray(_rows(rng, n, kind))
    budget = jnp.asarray(rng.integers(-1, n + 2, (2, 3)), jnp.int32)
    kv_len = jnp.asarray(rng.integers(0, n * BLOCK_K + 1, 2), jnp.int32)
    q_offset = jnp.maximum(kv_len - jnp.asarray(rng.integers(1, 20, 2)), 0)
    got = _kept_by_kernel_code(scores, budget, kv_len, q_offset, 'top_k')
    want = bc.kept_blocks_reference(scores, budget, kv_len, q_offset, block_k=BLOCK_K,
                                    rule='top_k')
    np.testing.assert_array_equal(got, want)


def test_top_k_keeps_exactly_the_budget_on_ties():
  """All scores equal: the budget's lowest-index candidates, not every tie."""
  n = 32
  scores = jnp.zeros((1, 1, n))
  kv_len, q_offset = jnp.array([n * BLOCK_K]), jnp.array([n * BLOCK_K - 1])
  kept = _kept_by_kernel_code(scores, jnp.array([[5]]), kv_len, q_offset, 'top_k')
  # Forced: block 0 and the last; then candidates 1..5.
  np.testing.assert_array_equal(np.flatnonzero(kept[0, 0]), [0, 1, 2, 3, 4, 5, n - 1])


@pytest.mark.parametrize('kind', ['ties', 'special'])
def test_keep_min_matches_reference(kind):
  """Integer scores and cutoffs put blocks exactly at keep_min (kept: >=)."""
  rng = np.random.default_rng(0)
  scores = jnp.asarray(_rows(rng, 40, kind))
  keep_min = jnp.asarray(rng.integers(-1, 2, (2, 3)), jnp.float32)
  kv_len, q_offset = jnp.array([640, 300]), jnp.array([639, 290])
  got = _kept_by_kernel_code(scores, keep_min, kv_len, q_offset, 'keep_min')
  want = bc.kept_blocks_reference(scores, keep_min, kv_len, q_offset, block_k=BLOCK_K,
                                  rule='keep_min')
  np.testing.assert_array_equal(got, want)


def test_order_key_orders_like_the_floats():
  x = jnp.array([-jnp.inf, -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, jnp.inf])
  keys = np.asarray(bc.order_key(x))
  assert np.all(np.diff(keys) >= 0) and keys[3] == keys[4]
  assert bc.order_key(jnp.array(jnp.nan)) < keys[0]


@pytest.mark.parametrize('log_scores', [False, True])
def test_relative_cutoff_is_the_gate_threshold_rule(log_scores):
  """keep_min from relative_cutoff keeps what sparse_gate.select_blocks keeps
  with a threshold alone (one query block, forced = block 0 + new tokens')."""
  rng = np.random.default_rng(1)
  n, threshold = 24, 0.3
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((2, 3, n)) * 2), axis=-1)
  kv_len, q_offset = jnp.array([n * BLOCK_K, 200]), jnp.array([n * BLOCK_K - 2, 199])
  idx = jnp.arange(n)
  live = idx * BLOCK_K < kv_len[:, None]
  forced = (idx == 0) | (idx >= q_offset[:, None] // BLOCK_K)
  want = sparse_gate.select_blocks(probs[:, :, None], live[:, None],
                                   forced[:, None, None], threshold=threshold, top_k=0)
  scores = jnp.log(probs) if log_scores else probs
  keep_min = bc.relative_cutoff(scores, threshold, kv_len, block_k=BLOCK_K,
                                log_scores=log_scores)
  got = bc.kept_blocks_reference(scores, keep_min, kv_len, q_offset, block_k=BLOCK_K,
                                 rule='keep_min')
  np.testing.assert_array_equal(got, want[:, :, 0])
