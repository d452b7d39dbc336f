"""Which cache blocks a decode step reads, picked from block scores without a sort.

A decode step scores every key block of a (batch, kv head) row, scores
[B, Hkv, nK], and reads:
  - the forced blocks: block 0 (the attention sink) and every block holding a
    new token (j >= q_offset // block_k);
  - rule 'keep_min': every other block scoring >= keep_min[b, h] (all ties
    at keep_min; NaN never);
  - rule 'top_k': the budget[b, h] best-scoring other blocks. Ties at the
    cutoff go to the lower block index, as in lax.top_k, so a row reads
    exactly min(budget, candidates) of them besides the forced ones; NaN ranks
    below every number;
and never a block starting at or beyond kv_len.

`kept_blocks` runs on one row inside a Triton program (sparse_decode_scored),
so it uses only whole-row compares and sums: the top-k cutoff is a radix
select over int32 keys that order like the scores, 4 bits a round, each round
counting for 16 trial cutoffs at once how many candidates reach them (8 rounds
for the key, ceil(log2(N) / 4) over the index bits for the ties). `kept_blocks_reference`
gets the same blocks from a sort, for the tests.
"""

import jax.numpy as jnp
from jax import lax

RULES = ('keep_min', 'top_k')
INT_MIN = -2 ** 31
_DIGIT_BITS = 4


def order_key(x):
  """int32 keys of f32 x in the same order; -0.0 and 0.0 share a key, NaN
  takes INT_MIN (below -inf)."""
  bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
  # Negative floats order backwards as ints: flip all but the sign bit.
  key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  return jnp.where(x == x, key, INT_MIN)


def _largest_passing(start, bits, passes):
  """The largest x = start ^ (any value of `bits` bits) with passes(x), where
  x ^ (d << shift) grows with the digit d and passes holds up to some x and not
  after. passes maps trials [16, 1] to bool [16]. With start = INT_MIN the XOR
  covers the sign bit too, which walks all int32 in increasing order."""
  x = jnp.int32(start)
  digits = jnp.arange(2 ** _DIGIT_BITS, dtype=jnp.int32)[:, None]
  for shift in range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
    passing = jnp.sum(passes(x ^ (digits << shift)).astype(jnp.int32))
    # Digit 0 passes by induction (x did) unless nothing ever passes.
    x = x ^ (jnp.maximum(passing - 1, 0) << shift)
  return x


def top_k_cutoff(keys, candidates, budget):
  """(key, last) such that the `budget` best candidates of one row are those
  with keys > key, or keys == key and index <= last (lax.top_k's choice).

  keys int32 [N] (order_key), candidates bool [N], budget an int scalar. Fewer
  candidates than the budget: all of them; budget <= 0: none.
  """
  count = lambda hit: jnp.sum(hit.astype(jnp.int32), axis=-1)
  key = _largest_passing(INT_MIN, 32,
                         lambda t: count(candidates & (keys >= t)) >= budget)
  ties = candidates & (keys == key)
  need = budget - count(candidates & (keys > key))
  n = keys.shape[-1]
  idx = jnp.arange(n, dtype=jnp.int32)
  index_bits = _DIGIT_BITS * max(1, -(-(n - 1).bit_length() // _DIGIT_BITS))
  # The need-th tie is the largest x with fewer than `need` ties before it.
  last = _largest_passing(0, index_bits, lambda t: count(ties & (idx < t)) < need)
  return key, jnp.where(need > 0, last, -1)


def kept_blocks(scores, cutoff, kv_len, q_offset, *, block_k, rule):
  """bool [N]: the blocks one (batch, kv head) row reads (module docstring).

  scores f32 [N]; cutoff the row's keep_min (f32) or budget (int); kv_len and
  q_offset int scalars.
  """
  idx = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  live = idx * block_k < kv_len
  forced = (idx == 0) | (idx >= lax.div(q_offset, block_k))   # q_offset >= 0
  if rule == 'keep_min':
    chosen = scores >= cutoff
  else:
    keys = order_key(scores)
    key, last = top_k_cutoff(keys, live & ~forced, cutoff)
    chosen = (keys > key) | ((keys == key) & (idx <= last))
  return live & (forced | chosen)


def kept_blocks_reference(scores, cutoff, kv_len, q_offset, *, block_k, rule):
  """bool [B, Hkv, nK] by the same rules from scores [B, Hkv, nK] and cutoff
  [B, Hkv]; the top-k through a stable sort."""
  col = lambda x: jnp.asarray(x, jnp.int32)[:, None, None]
  idx = jnp.arange(scores.shape[-1])
  live = idx * block_k < col(kv_len)
  forced = (idx == 0) | (idx >= col(q_offset) // block_k)
  if rule == 'keep_min':
    chosen = scores >= cutoff[..., None]
  else:
    candidates = live & ~forced
    # Candidates first, then by descending score (NaN last); stable on ties,
    # and -0.0 ties with 0.0 as in order_key (a sort orders them).
    others = jnp.broadcast_to(~candidates, scores.shape)
    order = jnp.lexsort((-jnp.where(scores == 0, 0.0, scores), others), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    chosen = candidates & (rank < cutoff[..., None])
  return live & (forced | chosen)


def relative_cutoff(scores, threshold, kv_len, *, block_k, log_scores=False):
  """keep_min [B, Hkv] of the gate's threshold rule (sparse_gate.select_blocks):
  keep a block scoring at least `threshold` times the row's best live block.
  Scores that are logits or log-probabilities compare in log space, best +
  log(threshold) (threshold 0 keeps every block)."""
  live = jnp.arange(scores.shape[-1]) * block_k < jnp.asarray(kv_len)[:, None, None]
  best = jnp.max(jnp.where(live, scores, -jnp.inf), axis=-1)
  return best + jnp.log(threshold) if log_scores else best * threshold
