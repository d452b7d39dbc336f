"""select_triton's kernels in the Triton interpreter: the pooling and the
scored tables against the XLA path they replace (benchmarks/attention.py's
selection stage). Inputs are small integers, so every sum is exact and the
tables must agree exactly, not just up to near-ties. The table builder alone
is checked with the other tables_from_scores methods (test_sparse_attention.py)
and every kernel's GPU lowering in test_lowering.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as bench
from benchmarks import budgets
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import select_triton


def _int_inputs(seed, b, t, hq, hkv, d):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  q = jax.random.randint(keys[0], (b, t, hq, d), -3, 4).astype(jnp.bfloat16)
  k = jax.random.randint(keys[1], (b, t, hkv, d), -3, 4).astype(jnp.bfloat16)
  return q, k


@pytest.mark.parametrize('seq, block_k, prefix', [(384, 64, 0), (256, 128, 100)])
def test_fused_selection_equals_the_xla_stage(seq, block_k, prefix):
  """benchmarks/attention.py's `fused` selection (both kernels) gives the
  `top_k` path's tables: causal, a ragged key-block count (6, padded to 8),
  and a bidirectional prefix; at full budget so do the mask's tables."""
  q, k = _int_inputs(seq, 1, seq, 8, 2, 64)
  visible = budgets.visible_tiles(seq, bench.BQ, block_k, prefix)
  for keep in (0.35, 1.0):
    want = bench.select_blocks(q, k, keep, visible, block_k, 'top_k', dense_shortcut=False)
    got = bench.select_blocks(q, k, keep, visible, block_k, 'fused', dense_shortcut=False)
    assert bench.same_tables(got, want)
  # Dense mode's tables, the mask's (no scores), are the ones scoring all would give.
  assert bench.same_tables(bench.select_blocks(q, k, 1.0, visible, block_k, 'fused'), want)


@pytest.mark.parametrize('new, n_k, budget', [(1, 16, 6), (4, 12, 5), (1, 8, 8)])
def test_fused_decode_selection_equals_the_xla_one(new, n_k, budget):
  """A decode step's `fused` tables (one kernel) are the `top_k` path's: one
  or four new tokens, a ragged block count (12, padded to 16), all blocks."""
  q, _ = _int_inputs(new, 2, new, 8, 2, 64)
  _, pooled = _int_inputs(n_k, 2, n_k, 8, 2, 64)
  want = bench.decode_tables(q, pooled, budget, 'top_k')
  got = bench.decode_tables(q, pooled, budget, 'fused')
  assert bench.same_tables(bt.BlockTables(*got, None, None), bt.BlockTables(*want, None, None))
  assert (np.asarray(got[1]) == budget).all() and (np.asarray(got[0])[..., 0] == 0).all()


def test_pool_keys_is_the_block_max():
  _, k = _int_inputs(1, 2, 256, 4, 2, 32)
  kp = select_triton.pool_keys(k, block_k=32, interpret=True)
  np.testing.assert_array_equal(kp, k.reshape(2, 8, 32, 2, 32).max(axis=2))


def test_score_tables_pools_each_tile_and_its_group():
  """Scores against one-hot pooled keys pick the dims of each tile's mean
  query (over its rows and its group's heads) that are largest."""
  q, _ = _int_inputs(2, 2, 256, 8, 2, 16)
  kp = jnp.broadcast_to(jnp.eye(16, dtype=jnp.bfloat16)[None, :, None], (2, 16, 2, 16))
  rule = jnp.full((2, 16), select_triton.CANDIDATE, jnp.int8)
  ids, count = select_triton.score_tables(q, kp, rule, jnp.array([16, 16], jnp.int32), 16,
                                          block_q=128, interpret=True)
  np.testing.assert_array_equal(count, 16)
  mean = q.astype(jnp.float32).reshape(2, 2, 128, 2, 4, 16).mean(axis=(2, 4))   # [B, nQ, Hkv, D]
  mean = mean.astype(jnp.bfloat16).astype(jnp.float32).transpose(0, 2, 1, 3)
  want = bt.tables_from_scores(mean, jnp.full((2, 2, 2), 5, jnp.int32), 5)
  got = select_triton.score_tables(q, kp, rule, jnp.array([5, 5], jnp.int32), 5,
                                   block_q=128, interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  # padded: the kernel's power-of-two width, each row's last id repeated past 5.
  ids, count = select_triton.score_tables(q, kp, rule, jnp.array([5, 5], jnp.int32), 5,
                                          block_q=128, interpret=True, padded=True)
  np.testing.assert_array_equal(count, want[1])
  np.testing.assert_array_equal(ids, jnp.concatenate(
      [want[0], jnp.repeat(want[0][..., -1:], 3, axis=-1)], axis=-1))


def test_selection_passes_under_grad():
  """A loss through attention whose tables these kernels build differentiates
  (the fused fwd+bwd benchmark failed in linearization before): the tables
  carry no gradient, the values' path does."""
  q, k = _int_inputs(3, 1, 256, 4, 1, 32)
  visible = budgets.visible_tiles(256, bench.BQ, 64)

  def loss(q, k):
    tables = bench.select_blocks(q, k, 0.5, visible, 64, 'fused')
    scores = select_triton.tables_from_scores(
        jnp.einsum('btd,bsd->bts', q[:, :, 0], k[:, :, 0]), 3, 3, interpret=True)
    return (jnp.sum(q.astype(jnp.float32)) * jnp.sum(tables.kv_count)
            + jnp.sum(k.astype(jnp.float32)) * jnp.sum(scores[1]))
  dq, dk = jax.grad(loss, argnums=(0, 1))(q, k)
  assert dq.shape == q.shape and float(jnp.abs(dq.astype(jnp.float32)).min()) > 0
  assert float(jnp.abs(dk.astype(jnp.float32)).min()) > 0


def test_a_scalar_budget_broadcasts_over_rows():
  """Every row reads the one budget (a Python int or a 0-d array); padded, the
  ids keep the kernel's power-of-two width, each row's last id repeated."""
  scores = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 20))
  want = bt.tables_from_scores(scores, jnp.full((3, 2), 5, jnp.int32), 7)
  for budget in (5, jnp.int32(5)):
    got = select_triton.tables_from_scores(scores, budget, 7, interpret=True)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  ids, count = bt.tables_from_scores(scores, jnp.int32(5), 7, method='pallas', padded=True)
  np.testing.assert_array_equal(count, want[1])
  np.testing.assert_array_equal(ids, jnp.concatenate(
      [want[0], jnp.repeat(want[0][..., -1:], 1, axis=-1)], axis=-1))


@pytest.mark.parametrize('b, h, n_q, n_k, width', [
    (2, 3, 6, 5, 5),       # ragged: nQ and the width padded to powers of two
    (1, 2, 40, 64, 64),    # 64-entry rows: passes of 64 tiles, nQ padded to them
    (1, 1, 24, 300, 200),  # 256-wide rows: passes of 16 tiles
])
def test_q_tables_transpose_the_kv_tables(b, h, n_q, n_k, width):
  """q_tables gives with_q_tables' lists and counts (empty kv rows included:
  the budgets reach 0), padded past nQ with each row's last id as
  compact_rows pads."""
  keys = jax.random.split(jax.random.PRNGKey(n_q), 2)
  scores = jax.random.normal(keys[0], (b, h, n_q, n_k))
  budget = jax.random.randint(keys[1], (b, h, n_q), 0, min(width, 12) + 1)
  kv_ids, kv_count = bt.tables_from_scores(scores, budget, width)
  want = bt.with_q_tables(bt.BlockTables(kv_ids, kv_count, None, None), n_k)
  q_ids, q_count = select_triton.q_tables(kv_ids, kv_count, n_k, interpret=True)
  np.testing.assert_array_equal(q_count, want.q_count)
  np.testing.assert_array_equal(q_ids[..., :n_q], want.q_ids)
  last = jnp.take_along_axis(q_ids, jnp.maximum(q_count - 1, 0)[..., None], axis=-1)
  np.testing.assert_array_equal(q_ids[..., n_q:], jnp.broadcast_to(last, q_ids[..., n_q:].shape))
  assert int(jnp.sum(kv_count == 0)) > 0


def _ranked(hq, rule_width, **options):
  """decode_ranked_tables on zeros: q of hq heads, 8 pooled blocks of 2 kv heads."""
  return select_triton.decode_ranked_tables(
      jnp.zeros((1, 1, hq, 32)), jnp.zeros((1, 8, 2, 32)), jnp.zeros((rule_width,), jnp.int8),
      2, 2, **options)


@pytest.mark.parametrize('call, match', [
    (lambda: select_triton.q_tables(jnp.zeros((1, 2, 4, 3), jnp.int32),
                                    jnp.zeros((1, 2, 3), jnp.int32), 8), 'kv_count.shape'),
    (lambda: select_triton.pool_keys(jnp.zeros((1, 200, 1, 32)), block_k=64), 'whole blocks'),
    (lambda: select_triton.score_tables(jnp.zeros((1, 128, 3, 32)), jnp.zeros((1, 2, 1, 32)),
                                        jnp.zeros((1, 2), jnp.int8), jnp.zeros((1,), jnp.int32),
                                        2, block_q=128), 'group=3'),
    (lambda: select_triton.score_tables(jnp.zeros((1, 256, 1, 32)), jnp.zeros((1, 4, 1, 32)),
                                        jnp.zeros((2, 3), jnp.int8), jnp.zeros((2,), jnp.int32),
                                        2, block_q=128), 'rule'),
    (lambda: _ranked(4, 9), 'rule.shape'),
    (lambda: _ranked(6, 8), 'group=3'),
    (lambda: _ranked(4, 8, span=6), 'span=6'),
])
def test_bad_shapes_name_the_problem(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def _listed(ids, count):
  ids, count = np.asarray(ids), np.asarray(count)
  return [sorted(ids[r][:count[r]]) for r in np.ndindex(count.shape)]


@pytest.mark.parametrize('new, n_k, budget, chunk, span', [
    (1, 16, 6, 4, 512),   # four programs a row, one span
    (4, 12, 5, 4, 8),     # four new tokens; 12 blocks padded to 16, two spans
    (1, 8, 8, 8, 512),    # every block
    (2, 40, 11, 16, 16),  # a ragged row over several chunks and spans, a hidden block
])
def test_ranked_decode_tables_keep_top_ks_blocks_best_first(new, n_k, budget, chunk, span):
  """decode_ranked_tables keeps the `top_k` path's blocks, each row's list
  in rank order (forced blocks, then by falling score), padded with its last."""
  q, _ = _int_inputs(new, 2, new, 8, 2, 64)
  _, kp = _int_inputs(n_k, 2, n_k, 8, 2, 64)
  rule = np.full(n_k, select_triton.CANDIDATE, np.int8)
  rule[[0, n_k - 1]] = select_triton.FORCED
  rule[n_k // 3] = select_triton.HIDDEN
  scores = bench.decode_scores(q, kp)
  scores = jnp.where(rule == select_triton.FORCED, jnp.inf,
                     jnp.where(rule == select_triton.CANDIDATE, scores, -jnp.inf))
  want = bt.tables_from_scores(scores, jnp.int32(budget), budget)
  ids, count = select_triton.decode_ranked_tables(q, kp, jnp.asarray(rule), budget, budget,
                                                  chunk=chunk, span=span, interpret=True)
  np.testing.assert_array_equal(count, want[1])
  assert _listed(ids, count) == _listed(*want)
  keys = np.asarray(bt.total_order_key(scores))
  for r in np.ndindex(count.shape):
    listed = np.asarray(ids[r])
    kept = listed[:count[r]]
    step = np.diff(keys[r][kept].astype(np.int64))
    assert (step <= 0).all() and (np.diff(kept)[step == 0] > 0).all()   # ties: lower first
    assert (listed[count[r]:] == listed[count[r] - 1]).all()
  # decode_tables' `ranked`: the same blocks as its `top_k`.
  assert _listed(*bench.decode_tables(q, kp, budget, 'ranked')) == _listed(
      *bench.decode_tables(q, kp, budget, 'top_k'))


@pytest.mark.parametrize('rows, width, launch', [
    (32, 512, (128, 16)),   # batch 8 x 32k, 4 kv heads: 4 programs a row
    (4, 512, (32, 8)),      # batch 1 x 32k: 16 programs a row
    (32, 128, (32, 8)),     # batch 8 x 8k
    (32, 64, (32, 8)),      # batch 8 x 8k in 128-key blocks: chunks of 16 would be slower
    (1, 8, (8, 8)),         # a row narrower than the smallest chunk
])
def test_ranked_launch_aims_at_one_program_an_sm(rows, width, launch):
  assert select_triton.ranked_launch(rows, width) == launch


def test_ranked_decode_tables_match_tables_from_scores_on_odd_scores():
  """Per-row budgets and rules, +-inf and NaN scores (a NaN pooled key), an
  empty row (budget 0): the counts and kept sets of tables_from_scores."""
  q, _ = _int_inputs(5, 2, 1, 4, 2, 32)
  _, kp = _int_inputs(6, 2, 32, 4, 2, 32)
  kp = kp.at[0, 3, 0, 0].set(jnp.nan).at[1, 7, 1, :].set(jnp.inf)
  rule = np.full((2, 32), select_triton.CANDIDATE, np.int8)
  rule[0, :4] = select_triton.HIDDEN
  rule[1, 9] = select_triton.FORCED
  budget = jnp.array([[7, 0], [3, 32]], jnp.int32)
  ids, count = select_triton.decode_ranked_tables(q, kp, jnp.asarray(rule), budget, 32,
                                                  chunk=8, interpret=True)
  scores = bench.decode_scores(q, kp)
  rule_b = jnp.asarray(rule)[:, None]
  scores = jnp.where(rule_b == select_triton.FORCED, jnp.inf,
                     jnp.where(rule_b == select_triton.CANDIDATE, scores, -jnp.inf))
  want = bt.tables_from_scores(scores, budget, 32)
  np.testing.assert_array_equal(count, want[1])
  assert _listed(ids, count) == _listed(*want)
  assert int(count[0, 1]) == 0 and (np.asarray(ids[0, 1]) == 0).all()
