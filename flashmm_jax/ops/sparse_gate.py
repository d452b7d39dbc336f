"""The math of the sparse-attention block gate (issue #10), in plain jnp.

SeerAttention-style: queries are average-pooled and keys max/min/mean-pooled
per block, a small learned projection per head scores (query block, key
block) pairs, a softmax over key blocks turns the scores into probabilities,
and a selection rule turns those into a block mask for the kernels.

The learned projections are an NNX module in models/gate.py: params need
models.layers.param (logical axes) and ops/ does not import models/. Here
live the parameter-free pieces, each testable alone: pooling, which tiles the
element mask leaves visible, selection, table width, the distillation target
(a dense pass that never materialises S x S), its KL loss and the sparsity
statistics.

Shapes: q [B, T, Hq, D], k [B, S, Hkv, D] with T, S multiples of the block
sizes (pad_axis pads them); block arrays are [B, Hkv, nQ, nK] (one selection
per GQA group, as the kernels' tables) or [B, nQ, nK] (the element mask's
tiles, the same for every head). Queries start at position 0 (training and
prefill): the block a query sits in is its diagonal block. A decode step is
one query block, its new tokens, at q_offset; it pools the cached keys from
running per-block statistics (fold_key_stats) instead of the keys themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Large but finite: an invisible tile's gate logit. -inf would make the KL's
# 0 * log(0) terms NaN in the backward pass.
_INVISIBLE_LOGIT = -1e9


def pad_axis(x, axis, multiple):
  """Zero-pads `axis` of x up to a multiple of `multiple`."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _blocks(x, block):
  """[B, N, H, D] -> [B, N / block, block, H, D]."""
  b, n = x.shape[:2]
  if n % block:
    raise ValueError(f'sequence length {n} must be a multiple of block size {block}')
  return x.reshape(b, n // block, block, *x.shape[2:])


def pool_queries(q, block_q, num_queries):
  """Mean of each block's real query rows (row < num_queries): [B, nQ, Hq, D] in f32."""
  x = _blocks(q.astype(jnp.float32), block_q)
  rows = (jnp.arange(q.shape[1]) < num_queries).reshape(1, -1, block_q, 1, 1)
  return (x * rows).sum(2) / jnp.maximum(rows.sum(2), 1)


def pool_keys(k, block_k, kv_len):
  """Max, min and mean over each block's real keys (j < kv_len[b]), concatenated:
  [B, nK, Hkv, 3D] in f32; a block without real keys pools to zeros."""
  x = _blocks(k.astype(jnp.float32), block_k)
  j = jnp.arange(k.shape[1]).reshape(1, -1, block_k, 1, 1)
  real = j < jnp.asarray(kv_len, jnp.int32).reshape(-1, 1, 1, 1, 1)
  return _pooled(jnp.where(real, x, -jnp.inf).max(2), jnp.where(real, x, jnp.inf).min(2),
                 (x * real).sum(2), real.sum(2))


def _pooled(hi, lo, total, count):
  """pool_keys' output from a block's max, min, sum and count of real keys."""
  any_real = count > 0
  return jnp.concatenate([jnp.where(any_real, hi, 0.0), jnp.where(any_real, lo, 0.0),
                          total / jnp.maximum(count, 1)], axis=-1)


# A decode step's KV cache keeps these per key block, over the pre-rotary keys
# written so far: pooling then costs O(nK) per step, not a pass over the cache
# (and models/gate.py keeps each block's projected gate key beside them, so a
# step re-projects only the block its new token lands in).
KEY_STATS = ('gate_max', 'gate_min', 'gate_sum')


def empty_key_stats(batch, n_k, num_kv_heads, head_dim):
  """Statistics of no keys, named as in the cache: f32 [B, nK, Hkv, D] each.
  Max -inf and min +inf, so a block's first key replaces them."""
  shape = (batch, n_k, num_kv_heads, head_dim)
  return dict(gate_max=jnp.full(shape, -jnp.inf), gate_min=jnp.full(shape, jnp.inf),
              gate_sum=jnp.zeros(shape))


def fold_key_stats(stats, k, positions, kv_len, block_k):
  """Folds keys k [B, T, Hkv, D] at absolute positions [B, T] into the KEY_STATS
  of `stats` (other entries are ignored); returns the new KEY_STATS. Keys at
  positions >= kv_len[b] are padding and stay out. The sum counts a key as
  often as it is folded, so each position must be folded once."""
  n_k = stats['gate_max'].shape[1]
  real = positions < jnp.asarray(kv_len, jnp.int32)[:, None]
  block = jnp.where(real, positions // block_k, n_k)     # n_k: out of range, dropped
  at = lambda name: stats[name].at[jnp.arange(k.shape[0])[:, None], block]
  k = k.astype(jnp.float32)
  return dict(gate_max=at('gate_max').max(k, mode='drop'),
              gate_min=at('gate_min').min(k, mode='drop'),
              gate_sum=at('gate_sum').add(k, mode='drop'))


def pooled_key_stats(stats, kv_len, block_k, blocks=None):
  """pool_keys of every key < kv_len[b], from the KEY_STATS that hold exactly
  those keys: [B, nK, Hkv, 3D] in f32. blocks: int [B, n], the key blocks to
  pool (block_stats of them; default every block)."""
  if blocks is None:
    blocks = jnp.arange(stats['gate_max'].shape[1])[None]
  else:
    stats = block_stats(stats, blocks)
  count = jnp.clip(jnp.asarray(kv_len, jnp.int32)[:, None] - blocks * block_k, 0, block_k)
  return _pooled(stats['gate_max'], stats['gate_min'], stats['gate_sum'],
                 count[:, :, None, None])


def block_stats(stats, blocks):
  """The KEY_STATS of key blocks blocks [B, n] (row b's own): [B, n, Hkv, D] each."""
  return {name: jnp.take_along_axis(stats[name], blocks[:, :, None, None], axis=1)
          for name in KEY_STATS}


def element_visible(mask, q_pos, k_pos):
  """bool [B, len(q_pos), len(k_pos)]: the MaskSpec rule at query positions q_pos
  (relative to mask.q_offset) and absolute key positions k_pos."""
  col = lambda a: jnp.asarray(a, jnp.int32)[:, None, None]
  i, j = q_pos[None, :, None], k_pos[None, None, :]
  visible = j < col(mask.kv_len)
  if mask.causal:
    visible &= (j < col(mask.prefix_len)) | (j <= col(mask.q_offset) + i)
  return visible


def visible_tiles(mask, num_queries, num_keys, n_q, n_k, block_sizes):
  """bool [B, nQ, nK]: tiles holding at least one (query, key) pair the element
  mask allows, among the real rows (< num_queries) and keys (< num_keys).

  The smallest key and the largest query of a tile are the most visible pair,
  so one comparison per tile decides it.
  """
  bq, bk = block_sizes.block_q, block_sizes.block_k
  q_first = jnp.arange(n_q) * bq
  q_last = jnp.minimum(q_first + bq, num_queries) - 1
  k_first = jnp.arange(n_k) * bk
  visible = element_visible(mask, q_last, k_first)
  real = (q_first < num_queries)[:, None] & (k_first < num_keys)[None, :]
  return visible & real[None]


def _first_or_overlapping(q0, num_queries, k0, block_k):
  """Key blocks starting at k0 that are the first one or overlap the query
  positions [q0, q0 + num_queries); works on numpy and jnp alike."""
  return ((k0 < q0 + num_queries) & (k0 + block_k > q0)) | (k0 == 0)


def forced_tiles(n_q, n_k, block_sizes, dense_from=None):
  """bool [nQ, nK] (static): the first key block and the diagonal ones, those
  overlapping the query block's own positions. Kept whatever the gate says,
  so every real query sees the attention sink and itself. With dense_from, a
  query block holding any position >= dense_from keeps every key block (the
  element mask still hides what it must)."""
  bq, bk = block_sizes.block_q, block_sizes.block_k
  q0 = np.arange(n_q)[:, None] * bq
  forced = _first_or_overlapping(q0, bq, np.arange(n_k)[None, :] * bk, bk)
  if dense_from is not None:
    forced = forced | (q0 + bq > dense_from)
  return forced


def forced_decode_blocks(q_offset, num_new, n_k, block_k):
  """bool [B, 1, 1, nK] (select_blocks' forced at a decode step): block 0 and
  the blocks holding the num_new new tokens at q_offset[b].. -- forced_tiles
  with the new tokens as the query block."""
  q0 = jnp.asarray(q_offset, jnp.int32)[:, None, None, None]
  return _first_or_overlapping(q0, num_new, jnp.arange(n_k) * block_k, block_k)


def table_width(n_q, n_k, block_sizes, top_k, dense_from=None):
  """Static width of the kv tables: exact (nK) without a budget; else the
  budget plus the most forced blocks any query block has."""
  if top_k <= 0:
    return n_k
  forced = forced_tiles(n_q, n_k, block_sizes, dense_from)
  return int(min(n_k, top_k + forced.sum(-1).max()))


def decode_table_width(n_k, num_new, block_k, top_k):
  """table_width of a decode step: the budget plus block 0 and the most
  blocks num_new consecutive tokens can span."""
  if top_k <= 0:
    return n_k
  span = -(-(num_new - 1) // block_k) + 1
  return int(min(n_k, top_k + 1 + span))


def check_rule(threshold, top_k, coverage, where='sparse '):
  """Fails on a selection rule outside its range, naming the setting."""
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f'{where}threshold={threshold} must be in [0, 1]')
  if top_k < 0:
    raise ValueError(f'{where}top_k={top_k} must be >= 0 (0 = no budget)')
  if not 0.0 <= coverage <= 1.0:
    raise ValueError(f'{where}coverage={coverage} must be in [0, 1] (0 = off)')


def _coverage_keep(p, forced, coverage):
  """bool mask of the smallest set of blocks, forced ones first, whose
  probabilities sum to at least `coverage` (top-p over key blocks)."""
  order = jnp.argsort(-(p + 2.0 * forced), axis=-1)   # forced first, then by p
  sorted_p = jnp.take_along_axis(p, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p   # mass of the blocks ahead
  keep_sorted = before < coverage
  return jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)


def select_blocks(probs, visible, forced, *, threshold, top_k, coverage=0.0):
  """Block mask [B, Hkv, nQ, nK] from gate probabilities [B, Hkv, nQ, nK].

  A key block is kept if it passes every active rule:
  - threshold: its probability is at least `threshold` times the best one of
    its query block (relative, so one setting suits any number of key
    blocks; 0 passes everything);
  - top_k > 0: it is among the top_k non-forced blocks by probability;
  - coverage > 0: it is in the smallest set, forced blocks first and then by
    probability, whose probabilities sum to `coverage` (top-p: the kept
    count adapts to how spread the row's attention is).
  Forced blocks (first + diagonal) are always kept; a tile the element mask
  hides is never kept. One selection per kv head: its query heads read the
  same K/V tiles. visible is [B, nQ, nK]; forced a bool array broadcastable
  to [B, 1, nQ, nK]: static [nQ, nK] (forced_tiles) or per row [B, 1, nQ, nK]
  (forced_decode_blocks).
  threshold and coverage may be scalar arrays (a gate's state, checked where
  it was set): then they are arguments of a jitted caller, and an array
  coverage always runs the top-p sort (a value of 0 keeps it off).
  """
  numbers = (int, float)
  if isinstance(threshold, numbers) and isinstance(coverage, numbers):
    check_rule(threshold, top_k, coverage)
  visible = visible[:, None]
  p = jnp.where(visible, probs, 0.0)
  keep = p >= threshold * p.max(-1, keepdims=True)
  if top_k > 0:
    n_k = p.shape[-1]
    score = jnp.where(visible & ~forced, p, -1.0)
    _, top = lax.top_k(score, min(top_k, n_k))
    keep &= jax.nn.one_hot(top, n_k, dtype=jnp.bool_).any(-2)
  if not isinstance(coverage, numbers):
    keep &= _coverage_keep(p, forced & visible, coverage) | (coverage <= 0)
  elif coverage > 0:
    keep &= _coverage_keep(p, forced & visible, coverage)
  return (keep | forced) & visible


def gate_log_probs(logits, visible):
  """Gate logits [B, Hkv, G, nQ, nK] -> log-probabilities over key blocks of
  the GQA group [B, Hkv, nQ, nK]: the mean of its G query heads' softmaxes."""
  logits = jnp.where(visible[:, None, None], logits, _INVISIBLE_LOGIT)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(log_p, axis=2) - jnp.log(logits.shape[2])


def _block_row_stats(q, k, mask, block_k):
  """Per query row, the max logit and the logsumexp over each key block, and the
  logsumexp over all visible keys, one key block at a time (flash-style):
  ([nK, B, Hkv, G, T], [nK, B, Hkv, G, T], [B, Hkv, G, T])."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d) * d ** -0.5
  k_blocks = jnp.moveaxis(_blocks(k.astype(jnp.float32), block_k), 1, 0)
  rows = jnp.arange(t)

  def one_block(lse, xs):
    k_blk, kb = xs
    logits = jnp.einsum('btkgd,bskd->bkgts', qg, k_blk)
    visible = element_visible(mask, rows, kb * block_k + jnp.arange(block_k))
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    block_lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.logaddexp(lse, block_lse), (logits.max(-1), block_lse)

  lse0 = jnp.full((b, hkv, hq // hkv, t), -jnp.inf)
  lse, (block_max, block_lse) = lax.scan(one_block, lse0,
                                         (k_blocks, jnp.arange(k_blocks.shape[0])))
  return block_max, block_lse, lse


TARGETS = ('peak', 'mass')


def block_attention_target(q, k, mask, *, block_sizes, num_queries, kind='peak'):
  """The gate's distillation target [B, Hkv, nQ, nK], a distribution over key blocks.

  Per query row, a score for each key block, then the max over the query
  block's real rows (so a block one row needs is not averaged away), the
  mean over the GQA group's heads, renormalised over key blocks:
  - 'peak' (SeerAttention): exp(block max logit - logsumexp), the largest
    attention probability the row gives any key of the block;
  - 'mass': exp(block logsumexp - logsumexp), the share of the row's attention
    the block holds. Spread attention (counting, reading a chart) puts little
    weight on any one key but much on the blocks together; 'peak' ranks such
    blocks below one sharp sink.
  q, k are the rotated q, k the attention uses; the memory peak is one
  [B, Hq, T, block_k] slice, never S x S.
  """
  if kind not in TARGETS:
    raise ValueError(f'gate target {kind!r} must be one of {TARGETS}')
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  block_max, block_lse, lse = _block_row_stats(q, k, mask, block_sizes.block_k)
  score = block_max if kind == 'peak' else block_lse
  p = jnp.where(jnp.isfinite(lse), jnp.exp(score - lse), 0.0)  # [nK, B, Hkv, G, T]
  p = jnp.where(jnp.arange(q.shape[1]) < num_queries, p, 0.0)
  n_k, b, hkv, g, t = p.shape
  p = p.reshape(n_k, b, hkv, g, t // block_sizes.block_q, block_sizes.block_q).max(-1)
  p = jnp.moveaxis(p.mean(3), 0, -1)                               # [B, Hkv, nQ, nK]
  total = p.sum(-1, keepdims=True)
  return lax.stop_gradient(p / jnp.where(total > 0, total, 1.0))


def gate_kl(target, log_probs):
  """Mean over query blocks with a target of KL(target || gate), in nats."""
  t = target.astype(jnp.float32)
  log_t = jnp.log(jnp.where(t > 0, t, 1.0))
  per_row = jnp.where(t > 0, t * (log_t - log_probs), 0.0).sum(-1)
  rows = t.sum(-1) > 0
  return jnp.where(rows, per_row, 0.0).sum() / jnp.maximum(rows.sum(), 1)


def tile_stats(selected, visible, *, block_sizes, head_dim, group):
  """Counts behind the sparsity figures, as f32 scalars summed over batch and kv heads.

  visible_tiles: tiles the element mask leaves visible (what a dense
  block-skipping kernel computes); selected_tiles: those of them the gate
  keeps; flops_saved: forward attention FLOPs (q.k and p.v, each 2*bq*bk*D
  per query head) of the visible tiles not computed.
  """
  visible = jnp.broadcast_to(visible[:, None], selected.shape)
  kept = (selected & visible).sum(dtype=jnp.float32)
  total = visible.sum(dtype=jnp.float32)
  per_tile = tile_flops(block_sizes.block_q, block_sizes.block_k, head_dim, group)
  return dict(selected_tiles=kept, visible_tiles=total, flops_saved=(total - kept) * per_tile)


def tile_flops(block_q, block_k, head_dim, group):
  """Forward attention FLOPs of one (query block x key block) tile of a kv
  head: q.k and p.v, each 2 * block_q * block_k * head_dim, per query head."""
  return 4.0 * block_q * block_k * head_dim * group
