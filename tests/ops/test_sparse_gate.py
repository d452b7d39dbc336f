"""The sparse gate's math against brute-force numpy on small shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashmm_jax.ops import attention
from flashmm_jax.ops import sparse_gate as sg
from pallas_kernels.sparse_attention import block_tables as bt

BS = bt.BlockSizes(block_q=8, block_k=4)


def _mask(kv_len, prefix_len, causal=True):
  b = len(kv_len)
  return attention.MaskSpec(q_offset=jnp.zeros((b,), jnp.int32),
                            kv_len=jnp.asarray(kv_len, jnp.int32),
                            prefix_len=jnp.asarray(prefix_len, jnp.int32), causal=causal)


def _dense_visible(mask, t, s, num_queries):
  vis = np.array(mask.dense(t, s))
  vis[:, num_queries:] = False
  return vis


def _tiles(x, bq, bk, reduce):
  """[B, T, S] -> [B, T/bq, S/bk] by `reduce` over each tile."""
  b, t, s = x.shape
  return reduce(x.reshape(b, t // bq, bq, s // bk, bk), axis=(2, 4))


def test_pool_queries_averages_only_real_rows():
  q = np.random.default_rng(0).normal(size=(2, 16, 3, 5)).astype(np.float32)
  got = sg.pool_queries(q, 8, num_queries=11)
  np.testing.assert_allclose(got[:, 0], q[:, :8].mean(1), rtol=1e-5)
  np.testing.assert_allclose(got[:, 1], q[:, 8:11].mean(1), rtol=1e-5)


def test_pool_keys_max_min_mean_over_real_keys():
  k = np.random.default_rng(1).normal(size=(2, 12, 2, 3)).astype(np.float32)
  got = np.asarray(sg.pool_keys(k, 4, kv_len=np.array([6, 12])))
  assert got.shape == (2, 3, 2, 9)
  pooled = lambda x: np.concatenate([x.max(0), x.min(0), x.mean(0)], -1)
  np.testing.assert_allclose(got[0, 1], pooled(k[0, 4:6]), rtol=1e-5)  # keys 4, 5 only
  np.testing.assert_array_equal(got[0, 2], 0.0)  # no real key at all
  np.testing.assert_allclose(got[1, 2], pooled(k[1, 8:12]), rtol=1e-5)


def test_key_stats_folded_in_chunks_pool_like_pool_keys():
  """A prefill with padding (kv_len 5 of 7), then steps of 1 and 3 tokens that
  straddle block boundaries: the running statistics pool as the whole keys do."""
  k = np.random.default_rng(2).normal(size=(2, 16, 2, 3)).astype(np.float32)
  stats = sg.empty_key_stats(2, 4, 2, 3)
  for start, size, kv_len in [(0, 7, [5, 7]), (5, 1, [6, 8]), (6, 3, [9, 11])]:
    start = np.array([start, kv_len[1] - size])                # rows at their own positions
    positions = start[:, None] + np.arange(size)
    chunk = np.take_along_axis(k, positions[:, :, None, None], axis=1)
    stats = sg.fold_key_stats(stats, chunk, positions, np.array(kv_len), 4)
  kv_len = np.array([9, 11])
  pooled = sg.pooled_key_stats(stats, kv_len, 4)
  np.testing.assert_allclose(pooled, sg.pool_keys(k, 4, kv_len), rtol=1e-6)
  blocks = np.array([[2, 0], [3, 2]])                          # a partial and an empty block
  np.testing.assert_array_equal(sg.pooled_key_stats(stats, kv_len, 4, blocks),
                                np.take_along_axis(pooled, blocks[:, :, None, None], axis=1))


def test_forced_decode_blocks_are_the_first_and_the_new_tokens_blocks():
  got = np.asarray(sg.forced_decode_blocks(np.array([0, 5, 7, 15]), 2, 5, 4))[:, 0, 0]
  np.testing.assert_array_equal(got, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                      [1, 0, 0, 1, 1]])
  assert sg.decode_table_width(5, 2, 4, top_k=1) == 1 + got.sum(-1).max()
  assert sg.decode_table_width(5, 1, 4, top_k=0) == 5


@pytest.mark.parametrize('causal', [True, False])
def test_visible_tiles_match_the_element_mask(causal):
  mask = _mask([30, 19, 7], [5, 12, 3], causal)
  t, s, num_queries = 32, 32, 29
  got = sg.visible_tiles(mask, num_queries, s, t // BS.block_q, s // BS.block_k, BS)
  want = _tiles(_dense_visible(mask, t, s, num_queries), BS.block_q, BS.block_k, np.any)
  np.testing.assert_array_equal(got, want)


def test_forced_tiles_are_the_first_and_diagonal_blocks():
  forced = sg.forced_tiles(2, 4, bt.BlockSizes(block_q=8, block_k=4))
  np.testing.assert_array_equal(forced, [[1, 1, 0, 0], [1, 0, 1, 1]])
  # block_q < block_k: several query blocks share one diagonal key block.
  np.testing.assert_array_equal(sg.forced_tiles(4, 2, bt.BlockSizes(4, 8)),
                                [[1, 0], [1, 0], [1, 1], [1, 1]])


def test_query_blocks_from_dense_from_keep_every_key_block():
  bs = bt.BlockSizes(block_q=8, block_k=4)
  # Position 12 lies in query block 1: it and every later block are dense.
  np.testing.assert_array_equal(sg.forced_tiles(3, 6, bs, dense_from=12),
                                [[1, 1, 0, 0, 0, 0], [1] * 6, [1] * 6])
  np.testing.assert_array_equal(sg.forced_tiles(3, 6, bs, dense_from=16)[:2],
                                sg.forced_tiles(3, 6, bs)[:2])
  assert sg.table_width(3, 6, bs, top_k=1) == 4  # block 0, two diagonal ones, one more
  assert sg.table_width(3, 6, bs, top_k=1, dense_from=16) == 6


def _selection_inputs(seed=0):
  """(probs [3, 2, 4, 8], visible [3, 4, 8], forced [4, 8]) on a ragged prefix mask."""
  rng = np.random.default_rng(seed)
  mask = _mask([32, 25, 14], [9, 4, 14])
  visible = sg.visible_tiles(mask, 30, 32, 4, 8, BS)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 2, 4, 8)) * 2), -1)
  return probs, visible, sg.forced_tiles(4, 8, BS)


def _random_selection(threshold, top_k, seed=0):
  probs, visible, forced = _selection_inputs(seed)
  sel = sg.select_blocks(probs, visible, forced, threshold=threshold, top_k=top_k)
  return np.asarray(sel), np.asarray(visible), forced, np.asarray(probs)


@pytest.mark.parametrize('threshold,top_k', [(0.3, 0), (0.0, 2), (0.5, 1), (1.0, 0)])
def test_selection_keeps_forced_and_never_invisible(threshold, top_k):
  sel, visible, forced, _ = _random_selection(threshold, top_k)
  assert sel.shape == (3, 2, 4, 8)  # one selection per kv head: GQA groups share it
  vis = np.broadcast_to(visible[:, None], sel.shape)
  assert not (sel & ~vis).any(), 'an invisible tile was selected'
  np.testing.assert_array_equal(sel & forced & vis, forced & vis)
  if top_k:
    extra = (sel & ~forced).sum(-1)
    assert extra.max() <= top_k
    width = sg.table_width(4, 8, BS, top_k)
    tables = bt.build_block_tables(jnp.asarray(sel), max_k=width)
    np.testing.assert_array_equal(tables.kv_count, sel.sum(-1))  # nothing truncated


def test_threshold_is_monotone_and_zero_keeps_everything_visible():
  previous = None
  for threshold in (0.0, 0.1, 0.3, 0.6, 1.0):
    sel, visible, _, _ = _random_selection(threshold, 0)
    if previous is None:
      np.testing.assert_array_equal(sel, np.broadcast_to(visible[:, None], sel.shape))
    else:
      assert not (sel & ~previous).any(), f'threshold {threshold} added blocks'
    previous = sel
  assert previous.sum() < sel.size  # the top threshold really prunes


def test_top_k_picks_the_most_probable_blocks():
  sel, visible, forced, probs = _random_selection(0.0, 1, seed=3)
  vis = np.broadcast_to(visible[:, None], sel.shape)
  candidates = np.where(vis & ~forced, probs, -1.0)
  best = candidates.argmax(-1)
  has = candidates.max(-1) >= 0
  picked = np.take_along_axis(sel, best[..., None], -1)[..., 0]
  assert picked[has].all()


def test_gate_log_probs_average_the_group_heads():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(1, 2, 3, 2, 5)).astype(np.float32)  # [B, Hkv, G, nQ, nK]
  visible = np.ones((1, 2, 5), bool)
  visible[0, 0, 3:] = False
  got = np.exp(sg.gate_log_probs(jnp.asarray(logits), jnp.asarray(visible)))
  want = np.asarray(jax.nn.softmax(np.where(visible[:, None, None], logits, -np.inf), -1)).mean(2)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_coverage_keeps_the_fewest_blocks_reaching_the_mass():
  probs, visible, forced = _selection_inputs(seed=7)
  for coverage in (0.5, 0.8, 0.95):
    got = np.asarray(sg.select_blocks(probs, visible, forced,
                                      threshold=0.0, top_k=0, coverage=coverage))
    probs, visible = np.asarray(probs), np.asarray(visible)
    for b, h, i in np.ndindex(3, 2, 4):
      vis, p = visible[b, i], np.where(visible[b, i], probs[b, h, i], 0.0)
      want = set(np.flatnonzero(vis & forced[i]))   # always kept, and counted first
      mass = p[list(want)].sum()
      for j in sorted(np.flatnonzero(vis & ~forced[i]), key=lambda j: -p[j]):
        if mass >= coverage:
          break
        want.add(j)
        mass += p[j]
      assert set(np.flatnonzero(got[b, h, i])) == want, (coverage, b, h, i)


def test_coverage_combines_with_threshold_and_is_checked():
  sel, _, _, _ = _random_selection(0.3, 0)
  both = np.asarray(sg.select_blocks(*_selection_inputs(), threshold=0.3, top_k=0, coverage=0.6))
  assert not (both & ~sel).any() and both.sum() < sel.sum()
  with pytest.raises(ValueError, match='coverage=1.5'):
    sg.select_blocks(*_selection_inputs(), threshold=0.0, top_k=0, coverage=1.5)



def _brute_force_target(q, k, mask, bs, num_queries, kind):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  kk = np.repeat(k, hq // hkv, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q, kk) / np.sqrt(d)
  vis = np.array(mask.dense(t, k.shape[1]))[:, None]
  probs = np.asarray(jax.nn.softmax(np.where(vis, logits, -np.inf), -1))
  probs = np.nan_to_num(probs) * (np.arange(t) < num_queries)[:, None]
  tiles = probs.reshape(b, hq, t // bs.block_q, bs.block_q, -1, bs.block_k)
  # peak: the largest probability in the tile; mass: each row's sum over the
  # key block, then the largest over the rows.
  probs = tiles.max(axis=(3, 5)) if kind == 'peak' else tiles.sum(5).max(3)
  probs = probs.reshape(b, hkv, hq // hkv, *probs.shape[2:]).mean(2)
  return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize('kind', ['peak', 'mass'])
def test_target_equals_brute_force_block_pooled_attention(kind):
  rng = np.random.default_rng(5)
  q = rng.normal(size=(3, 16, 4, 8)).astype(np.float32)
  k = rng.normal(size=(3, 20, 2, 8)).astype(np.float32)
  mask = _mask([20, 13, 6], [7, 2, 6])
  got = sg.block_attention_target(jnp.asarray(q), jnp.asarray(k), mask, block_sizes=BS,
                                  num_queries=14, kind=kind)
  np.testing.assert_allclose(got, _brute_force_target(q, k, mask, BS, 14, kind), atol=1e-6)
  np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-6)


def test_kl_is_zero_at_the_target_and_positive_elsewhere():
  rng = np.random.default_rng(6)
  target = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 2, 3, 5))), -1)
  target = target.at[..., -1].set(0.0)  # an invisible block: target 0
  target = target / target.sum(-1, keepdims=True)
  target = target.at[1, 1, 2].set(0.0)  # a query block without target: ignored
  log_p = jnp.log(jnp.where(target > 0, target, 1e-30))
  assert abs(float(sg.gate_kl(target, log_p))) < 1e-6
  other = jax.nn.log_softmax(jnp.asarray(rng.normal(size=target.shape)), -1)
  assert float(sg.gate_kl(target, other)) > 0.01
  visible = jnp.ones((2, 3, 5), bool).at[..., -1].set(False)
  grad = jax.grad(lambda z: sg.gate_kl(target, sg.gate_log_probs(z, visible)))(
      jnp.asarray(rng.normal(size=(2, 2, 1, 3, 5)), jnp.float32))
  assert np.isfinite(grad).all()


def test_tile_stats_count_visible_tiles_and_saved_flops():
  visible = jnp.asarray([[[1, 1, 0], [1, 1, 1]]], bool)        # [B=1, nQ=2, nK=3]: 5 visible
  selected = jnp.asarray([[[[1, 1, 0], [1, 0, 1]],
                           [[1, 1, 1], [1, 1, 1]]]], bool)    # [B, Hkv=2, 2, 3]
  stats = sg.tile_stats(selected, visible, block_sizes=BS, head_dim=8, group=3)
  assert float(stats['visible_tiles']) == 10 and float(stats['selected_tiles']) == 9
  assert float(stats['flops_saved']) == 1 * 4 * 8 * 4 * 8 * 3
  dense = sg.tile_stats(jnp.broadcast_to(visible[:, None], selected.shape), visible,
                        block_sizes=BS, head_dim=8, group=3)
  assert float(dense['selected_tiles']) == float(dense['visible_tiles'])
  assert float(dense['flops_saved']) == 0.0


def test_bad_threshold_is_rejected():
  with pytest.raises(ValueError, match='threshold=1.5'):
    _random_selection(1.5, 0)
