"""Block selection in Pallas-Triton kernels: kv tables from block scores in one
kernel, and the pooling and scoring before them in two; a decode step's whole
selection in one kernel of several programs a row (decode_ranked_tables); and
the transposed tables the dk/dv pass reads, from the kv tables, in one
(q_tables).

block_tables.tables_from_scores' XLA methods build the kv tables in several
kernels (a top_k and a sort, or three compare-and-reduce passes, plus the
masking around them), each a launch of a few microseconds on a GPU; with the
score pooling, that selection stage is 0.05-0.06 ms of a 65%-sparse forward
at 4k-8k tokens whose kernel takes 0.22-0.36 ms (docs/results.md). Here one
program takes one row of scores and keeps its top `budget` in lax.top_k's
order: rows of up to RANK_MAX_WIDTH blocks by each entry's rank (one pass of
[W, W] compares), wider ones by block_cutoff's radix select (the one the
fused decode kernel runs); then the kept ids go to their slots by a cumsum
and a scatter.

The tables are tables_from_scores' exactly (tested against its other methods,
NaN and -0.0 included): the keys are block_tables.total_order_key, every real
entry competes for the budget, and -inf (and NaN) entries are never kept.

benchmarks/attention.py's `fused` selection runs its whole stage in two more
(the model's gate, with its learned projections, does not use them):
`pool_keys` max-pools every key block, and `score_tables` takes one row of
blocks a program: it mean-pools its own query tile (over the rows and the GQA
group's heads), scores it against the pooled keys, applies the row's
hidden/candidate/forced rule and writes its tables. q, the one big read (64 MB
at 16k tokens), is read once, by the programs that use it; an earlier version
pooled q and k in one launch and scored in a second, and under Nsight Compute
at 8k its pooling ran at 3.1 TB/s (28 us) and its scoring 8.8 us more.
Against the XLA path they sum in another order, so near-tied blocks may be
picked differently; on integer-valued inputs (exact sums) the tables agree.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import block_cutoff
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import triton_common as tc


def _row_tables_kernel(scores_ref, budget_ref, ids_ref, count_ref, *, n_k):
  """One row: scores [W] (W >= n_k, a power of two; entries past n_k are
  padding), its budget, ids [max_k padded to a power of two] and count."""
  _write_row_tables(scores_ref[...], budget_ref[...], ids_ref, count_ref, n_k=n_k)


# Up to this row width, a top-k by rank (block_tables.top_k_rank: [W, W]
# compares, one pass); wider, the radix select (~10 dependent passes over
# [16, W]; a [W, W] grid would be 256 registers a thread at W = 256, 8 warps).
# Under Nsight Compute at 8k tokens the rank took the fused scoring launch from
# 26.4 to 23.7 us (docs/results.md).
RANK_MAX_WIDTH = 128


def _write_row_tables(scores, budget, ids_ref, count_ref, *, n_k):
  """The row's top-`budget` blocks of scores [W] (entries past n_k ignored) as
  ascending ids padded with the last one, and their count."""
  idx = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
  keys = bt.total_order_key(scores)
  candidates = idx < n_k
  if scores.shape[0] <= RANK_MAX_WIDTH:   # kept: fewer than `budget` come before it
    chosen = bt.top_k_rank(keys, candidates) < budget
  else:
    key, last = block_cutoff.top_k_cutoff(keys, candidates, budget)
    chosen = (keys > key) | ((keys == key) & (idx <= last))
  keep = chosen & candidates & (scores > -jnp.inf)
  kept = keep.astype(jnp.int32)
  count = jnp.sum(kept)
  slot_of = jnp.cumsum(kept) - kept
  # Slots past the count repeat the last kept id, 0 in an empty row (compact_rows'
  # padding); the two stores write disjoint slots.
  last_id = jnp.max(jnp.where(keep, idx, 0))
  slot = jax.lax.broadcasted_iota(jnp.int32, ids_ref.shape, 0)
  plgpu.store(ids_ref, jnp.full(ids_ref.shape, last_id, jnp.int32), mask=slot >= count)
  plgpu.store(ids_ref.at[slot_of], idx, mask=keep)
  count_ref[...] = count


@functools.partial(jax.jit, static_argnames=('max_k', 'interpret', 'num_warps', 'padded'))
def tables_from_scores(scores: jax.Array, budget: jax.Array, max_k: int, *,
                       interpret: bool = False, num_warps: int = 4, padded: bool = False):
  """block_tables.tables_from_scores(scores, budget, max_k) in one kernel:
  (ids [..., max_k] int32 ascending, padded with the last id; count [...]).

  scores [..., nK] (any float dtype; compared in f32, which orders bf16 and
  f16 exactly); budget broadcasts to scores.shape[:-1] (a scalar is read by
  every program, not broadcast by a kernel of its own). One program a row.
  padded: ids as the kernel writes them, max_k rounded up to a power of two
  (entries past max_k repeat the last id), not sliced by another kernel.
  """
  # Tables are integers: nothing to differentiate, and a pallas_call has no
  # JVP, so a caller under jax.grad must not trace one through it.
  scores = jax.lax.stop_gradient(scores)
  n_k = scores.shape[-1]
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  lead = scores.shape[:-1]
  rows = math.prod(lead)
  width, out_width = pl.next_power_of_2(n_k), pl.next_power_of_2(max_k)
  # Triton blocks have power-of-two sizes: padding columns, never candidates.
  flat = jnp.pad(scores.astype(jnp.float32).reshape(rows, n_k), ((0, 0), (0, width - n_k)))
  cap = jnp.minimum(jnp.asarray(budget, jnp.int32), max_k)
  if cap.ndim:
    cap, cap_of = jnp.broadcast_to(cap, lead).reshape(rows), lambda r: (r,)
  else:
    cap, cap_of = cap.reshape(1), lambda r: (0,)
  ids, count = pl.pallas_call(
      functools.partial(_row_tables_kernel, n_k=n_k),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, width), lambda r: (r, 0)),
                pl.BlockSpec((None,), cap_of)],
      out_specs=[pl.BlockSpec((None, out_width), lambda r: (r, 0)),
                 pl.BlockSpec((None,), lambda r: (r,))],
      out_shape=[jax.ShapeDtypeStruct((rows, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(flat, cap)
  if not padded:
    ids = ids[:, :max_k]
  return ids.reshape(*lead, -1), count.reshape(lead)


def _pool_keys_kernel(k_ref, kp_ref):
  """One key block [block_k, D] of one kv head: its max over its rows."""
  kp_ref[...] = jnp.max(k_ref[...], axis=0)


@functools.partial(jax.jit, static_argnames=('block_k', 'interpret', 'num_warps'))
def pool_keys(k: jax.Array, *, block_k: int, interpret: bool = False, num_warps: int = 4):
  """kp [B, S / block_k, Hkv, D]: each key block's max over its rows, one
  program a block. k [B, S, Hkv, D], S whole blocks, block_k a power of two."""
  k = jax.lax.stop_gradient(k)   # selection only: see tables_from_scores
  b, s, hkv, d = k.shape
  if s % block_k or block_k & (block_k - 1):
    raise ValueError(f'pool_keys: {k.shape=} must hold whole blocks of {block_k=}, '
                     'a power of two')
  return pl.pallas_call(
      _pool_keys_kernel,
      grid=(b, hkv, s // block_k),
      in_specs=[pl.BlockSpec((None, block_k, None, d), lambda bi, h, j: (bi, j, h, 0))],
      out_specs=pl.BlockSpec((None, None, None, d), lambda bi, h, j: (bi, j, h, 0)),
      out_shape=jax.ShapeDtypeStruct((b, s // block_k, hkv, d), k.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps),
      interpret=interpret,
  )(k)


def _pooled_query(q_ref, i, *, block_q, rows_per_load):
  """Query tile i's mean over its rows and the group's query heads (q_ref
  [T, G, D]: one batch entry, one kv head's group), accumulated in f32."""
  group, d = q_ref.shape[1:]

  def add_rows(r, acc):
    rows = q_ref[pl.ds(i * block_q + r * rows_per_load, rows_per_load), :, :]
    return acc + jnp.sum(rows.astype(jnp.float32), axis=0)
  acc = jax.lax.fori_loop(0, block_q // rows_per_load, add_rows,
                          jnp.zeros((group, d), jnp.float32))
  return jnp.sum(acc, axis=0) / (block_q * group)


HIDDEN, CANDIDATE, FORCED = 0, 1, 2


def _score_kernel(q_ref, kp_ref, rule_ref, budget_ref, ids_ref, count_ref, *, n_k,
                  block_q, rows_per_load):
  """Program (b, h, i): query tile i pooled over its rows and head group, in
  q.dtype as the XLA path rounds it, against head h's pooled keys [W, D],
  masked by its rule row [W], then its tables."""
  query = _pooled_query(q_ref, pl.program_id(2), block_q=block_q, rows_per_load=rows_per_load)
  query = query.astype(q_ref.dtype).astype(jnp.float32)
  scores = jnp.sum(kp_ref[...].astype(jnp.float32) * query[None, :], axis=1)
  rule = rule_ref[...]
  scores = jnp.where(rule == FORCED, jnp.inf, jnp.where(rule == CANDIDATE, scores, -jnp.inf))
  _write_row_tables(scores, budget_ref[...], ids_ref, count_ref, n_k=n_k)


@functools.partial(jax.jit, static_argnames=('max_k', 'block_q', 'interpret', 'num_warps',
                                             'rows_per_load', 'num_stages', 'padded'))
def score_tables(q: jax.Array, kp: jax.Array, rule: jax.Array, budget: jax.Array,
                 max_k: int, *, block_q: int, interpret: bool = False,
                 num_warps: int | None = None, rows_per_load: int = 32, num_stages: int = 3,
                 padded: bool = False):
  """kv tables (ids [B, Hkv, nQ, max_k], count [B, Hkv, nQ]) of the blocks each
  query tile keeps, one program a (batch, kv head, query tile), which pools
  its own tile: q is read once, by the programs that score it.

  q [B, T, Hq, D] (T whole tiles of block_q rows, a multiple of rows_per_load;
  Hq / Hkv and D powers of two); kp [B, nK, Hkv, D] (pool_keys); rule int8
  [nQ, nK]: HIDDEN (never kept), CANDIDATE (ranked by the tile's mean query .
  kp, in f32), FORCED (kept first); budget int [nQ]: a row keeps its `budget`
  best (forced first, then by score; ties to the lower block), at most max_k.
  The same tables as block_tables.tables_from_scores of those masked scores.
  num_warps: by default 8 where a program's keys exceed 8192 elements (256
  blocks of 128 dims would be 256 registers a thread at 4 warps), else 4.
  rows_per_load, num_stages: the q tile is read rows_per_load rows (x the
  group's heads) a load, num_stages loads in flight (Triton's pipelining).
  32 rows a load took the persistent 65% forward 0.8% / 0.7% under 16's at
  4k / 8k, end to end, in alternation (H200, select_sweep.py --sweep_forward;
  docs/results.md).
  padded: ids keep the kernel's width, max_k rounded up to a power of two
  (entries past a count repeat its last id, as in the first max_k); kernels
  that read a row's first `count` entries take them as they are, and the slice
  to max_k, a copy kernel of its own on a GPU (~2 us), is saved.
  """
  q, kp = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kp)   # see tables_from_scores
  b, t, hq, d = q.shape
  n_k, hkv = kp.shape[1], kp.shape[2]
  n_q, group = t // block_q, hq // hkv
  if (t % block_q or block_q % rows_per_load or hq % hkv or kp.shape != (b, n_k, hkv, d)
      or rule.shape != (n_q, n_k) or budget.shape != (n_q,)):
    raise ValueError(f'score_tables: {q.shape=}, {kp.shape=}, {rule.shape=}, '
                     f'{budget.shape=} disagree ({block_q=} rows a tile, {rows_per_load=}; '
                     'rule [nQ, nK], budget [nQ])')
  for name, n in (('group', group), ('head_dim', d)):
    if n & (n - 1):
      raise ValueError(f'score_tables: {name}={n} must be a power of two')
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  width, out_width = pl.next_power_of_2(n_k), pl.next_power_of_2(max_k)
  if num_warps is None:
    num_warps = 8 if width * d > 8192 else 4
  # Triton blocks have power-of-two sizes: padding blocks are HIDDEN.
  rule = jnp.pad(rule.astype(jnp.int8), ((0, 0), (0, width - n_k)))
  if width != n_k:
    kp = jnp.pad(kp, ((0, 0), (0, width - n_k), (0, 0), (0, 0)))
  ids, count = pl.pallas_call(
      functools.partial(_score_kernel, n_k=n_k, block_q=block_q, rows_per_load=rows_per_load),
      grid=(b, hkv, n_q),
      in_specs=[pl.BlockSpec((None, t, group, d), lambda bi, h, i: (bi, 0, h, 0)),
                pl.BlockSpec((None, width, None, d), lambda bi, h, i: (bi, 0, h, 0)),
                pl.BlockSpec((None, width), lambda bi, h, i: (i, 0)),
                pl.BlockSpec((None,), lambda bi, h, i: (i,))],
      out_specs=[pl.BlockSpec((None, None, None, out_width), lambda bi, h, i: (bi, h, i, 0)),
                 pl.BlockSpec((None, None, None), lambda bi, h, i: (bi, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, n_q, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv, n_q), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(q, kp, rule, jnp.minimum(budget.astype(jnp.int32), max_k))
  return (ids if padded else ids[..., :max_k]), count


_INF_KEY = 0x7F800000   # total_order_key(+inf): a key above it is a +NaN


def _ranked_kernel(q_ref, kp_ref, rule_ref, budget_ref, ids_ref, count_ref, *, n_k, chunk,
                   span):
  """Program (b, h, c): the rank of chunk c's blocks among the row's
  candidates, scoring the row (the group's mean new query against its pooled
  keys [W, D]) `span` blocks a step; a kept block goes to its rank's slot.

  Ranks follow lax.top_k's order of total_order_key: +NaN first (each takes a
  place in the budget but is never kept, as in tables_from_scores), then the
  keepable scores (forced blocks at +inf ahead), then -inf and -NaN."""
  c = pl.program_id(2)
  # The mean query in f32, as benchmarks/attention.py's decode_scores.
  query = jnp.sum(jnp.sum(q_ref[...].astype(jnp.float32), axis=0), axis=0)
  query = query / (q_ref.shape[0] * q_ref.shape[1])

  def keys_of(start, size):
    """Blocks [start, start + size): keys, candidate, keepable, index."""
    rows = pl.ds(start, size)
    scores = jnp.sum(kp_ref[rows, :].astype(jnp.float32) * query[None, :], axis=1)
    rule = rule_ref[rows]
    scores = jnp.where(rule == FORCED, jnp.inf, jnp.where(rule == CANDIDATE, scores, -jnp.inf))
    idx = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    return bt.total_order_key(scores), idx < n_k, scores > -jnp.inf, idx

  own_key, own_cand, own_ok, own_idx = keys_of(c * chunk, chunk)
  total = lambda x: jnp.sum(x.astype(jnp.int32))
  rank, nans, oks = jnp.zeros((chunk,), jnp.int32), 0, 0
  # Unrolled: the spans' loads and compares overlap (a fori_loop over 128-block
  # spans, pipelined, took 13.3 us against 10.5 on an H200; docs/results.md).
  for start in range(0, kp_ref.shape[0], span):
    key, cand, ok, idx = keys_of(start, span)
    # Padding blocks never compete; a span without any needs no mask.
    rank += bt.count_ahead(own_key, own_idx, key, idx, cand if start + span > n_k else None)
    nans, oks = nans + total(cand & (key > _INF_KEY)), oks + total(cand & ok)
  count = jnp.clip(jnp.minimum(budget_ref[...], n_k) - nans, 0, oks)
  slot = rank - nans
  keep = own_ok & own_cand & (slot < count)
  # Lanes not kept aim past the row: masked on a GPU, dropped by the
  # interpreter (which writes masked lanes back, so a shared slot would race).
  plgpu.store(ids_ref.at[jnp.where(keep, slot, ids_ref.shape[0])], own_idx, mask=keep)
  # Slots past the count repeat the last kept id (its program writes them), 0
  # in an empty row (program 0 writes them).
  last = jnp.max(jnp.where(keep & (slot == count - 1), own_idx, -1))
  pad = jax.lax.broadcasted_iota(jnp.int32, ids_ref.shape, 0) >= count
  plgpu.store(ids_ref, jnp.full(ids_ref.shape, jnp.maximum(last, 0), jnp.int32),
              mask=pad & ((last >= 0) | ((count == 0) & (c == 0))))
  count_ref[...] = count


# Programs decode_ranked_tables aims for: about one an SM of an H100 or H200.
RANKED_PROGRAMS = 128


def ranked_launch(rows: int, width: int) -> tuple[int, int]:
  """decode_ranked_tables' default (chunk, num_warps) for `rows` rows of
  `width` blocks: chunks of a power of two in [32, 128] that make about
  RANKED_PROGRAMS programs. Chained whole steps on an H200 (docs/results.md):
  at batch 8 x 32k (32 rows of 512) chunks of 128 beat 64 by 8%; at 1 x 32k
  (4 rows of 512) 16 and 32 beat 128 by 10%; with 128-key blocks (256 and 64
  a row) 32 beat 16 by 3-4% at 1 x 32k and 8 x 8k."""
  chunk = pl.next_power_of_2(max(1, rows * width // RANKED_PROGRAMS))
  chunk = min(128, max(32, chunk), width)
  return chunk, 16 if chunk >= 64 else 8


@functools.partial(jax.jit, static_argnames=('max_k', 'chunk', 'span', 'interpret',
                                             'num_warps'))
def decode_ranked_tables(q: jax.Array, kp: jax.Array, rule: jax.Array, budget, max_k: int,
                         *, chunk: int | None = None, span: int = 512, interpret: bool = False,
                         num_warps: int | None = None):
  """A decode step's selection in one kernel, its ids in rank order (best
  first), several programs a row: (ids [B, Hkv, W'], count [B, Hkv]).

  score_tables' decode case (the new tokens as the query tile) keeps the same
  blocks, but one program a row ranks its W blocks in ~10 dependent passes of
  a radix select: latency-bound at 32 rows (17.7 us at batch 8, 4 kv heads,
  512 blocks on an H200; docs/results.md). Here program (b, h, c) scores the
  whole row (cheap: W x D multiply-adds, from L2 after the first program) and
  ranks only chunk c's blocks against it, in [chunk, span] compares (one pass
  at the defaults); a kept block's rank is its slot, so no program waits for
  another: 10 us there, 4 programs a row at 16 warps. chunk / num_warps None:
  ranked_launch's (about one program an SM). The decode kernels read
  a list in any order (each block's keys are masked by the one bound of a new
  token). Scores are f32 throughout, as attention.decode_scores'.

  q [B, M, Hq, D] (the M new tokens); kp [B, nK, Hkv, D] pooled keys; rule
  int8 [nK] or [B, nK]: HIDDEN, CANDIDATE or FORCED (select_triton's); budget
  int, a scalar or [B, Hkv]: blocks a row keeps, forced ones first, at most
  max_k. The kept set is tables_from_scores' on the same masked scores (ties
  to the lower block); W' is max_k rounded up to a power of two, slots past a
  count repeating the last kept id (0 in an empty row). M, Hq / Hkv, D, chunk
  and span are powers of two.
  """
  q, kp = jax.lax.stop_gradient(q), jax.lax.stop_gradient(kp)   # see tables_from_scores
  b, m, hq, d = q.shape
  n_k, hkv = kp.shape[1], kp.shape[2]
  group = hq // hkv
  if hq % hkv or kp.shape != (b, n_k, hkv, d) or rule.shape not in ((n_k,), (b, n_k)):
    raise ValueError(f'decode_ranked_tables: {q.shape=}, {kp.shape=} and {rule.shape=} '
                     'disagree (want q [B, M, Hq, D], kp [B, nK, Hkv, D], rule [nK] or [B, nK])')
  width = pl.next_power_of_2(n_k)
  auto_chunk, auto_warps = ranked_launch(b * hkv, width)
  chunk, num_warps = chunk or auto_chunk, num_warps or auto_warps
  for name, n in (('new tokens', m), ('group', group), ('head_dim', d), ('chunk', chunk),
                  ('span', span)):
    if n & (n - 1):
      raise ValueError(f'decode_ranked_tables: {name}={n} must be a power of two')
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  out_width = pl.next_power_of_2(max_k)
  chunk, span = min(chunk, width), min(span, width)
  rule = jnp.pad(jnp.asarray(rule, jnp.int8), [(0, 0)] * (rule.ndim - 1) + [(0, width - n_k)])
  if width != n_k:
    kp = jnp.pad(kp, ((0, 0), (0, width - n_k), (0, 0), (0, 0)))
  cap = jnp.minimum(jnp.asarray(budget, jnp.int32), max_k)
  if cap.ndim:
    cap, cap_of = jnp.broadcast_to(cap, (b, hkv)).reshape(b * hkv), lambda bi, h: (bi * hkv + h,)
  else:
    cap, cap_of = cap.reshape(1), lambda bi, h: (0,)
  rule_spec = (pl.BlockSpec((width,), lambda bi, h, c: (0,)) if rule.ndim == 1 else
               pl.BlockSpec((None, width), lambda bi, h, c: (bi, 0)))
  ids, count = pl.pallas_call(
      functools.partial(_ranked_kernel, n_k=n_k, chunk=chunk, span=span),
      grid=(b, hkv, width // chunk),
      in_specs=[pl.BlockSpec((None, m, group, d), lambda bi, h, c: (bi, 0, h, 0)),
                pl.BlockSpec((None, width, None, d), lambda bi, h, c: (bi, 0, h, 0)),
                rule_spec,
                pl.BlockSpec((None,), lambda bi, h, c: cap_of(bi, h))],
      out_specs=[pl.BlockSpec((None, None, out_width), lambda bi, h, c: (bi, h, 0)),
                 pl.BlockSpec((None, None), lambda bi, h, c: (bi, h))],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(q, kp, rule, cap)
  return ids, count


def _q_tables_kernel(ids_ref, count_ref, q_ids_ref, q_count_ref, *, chunk):
  """Program (b, h, kb): the query tiles whose kv list (ids_ref [nQ, W],
  count_ref [nQ]: one (batch, kv head)'s tables) holds key block kb, in
  ascending order, `chunk` tiles a pass; padded as compact_rows pads."""
  kb = pl.program_id(2)
  n_q, width = ids_ref.shape
  listed_at = jax.lax.broadcasted_iota(jnp.int32, (chunk, width), 1)
  tile_at = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

  def scan(c, carry):
    count, last = carry
    rows = pl.ds(c * chunk, chunk)
    listed = listed_at < count_ref[rows][:, None]
    hit = jnp.max(jnp.where(listed & (ids_ref[rows, :] == kb), 1, 0), axis=1)
    tile = c * chunk + tile_at
    plgpu.store(q_ids_ref.at[count + jnp.cumsum(hit) - hit], tile, mask=hit > 0)
    return count + jnp.sum(hit), jnp.maximum(last, jnp.max(jnp.where(hit > 0, tile, 0)))

  count, last = jax.lax.fori_loop(0, n_q // chunk, scan, (jnp.int32(0), jnp.int32(0)))
  slot = jax.lax.broadcasted_iota(jnp.int32, q_ids_ref.shape, 0)
  plgpu.store(q_ids_ref, jnp.full(q_ids_ref.shape, last, jnp.int32), mask=slot >= count)
  q_count_ref[...] = count


@functools.partial(jax.jit, static_argnames=('n_k', 'interpret', 'num_warps'))
def q_tables(kv_ids: jax.Array, kv_count: jax.Array, n_k: int, *,
             interpret: bool = False, num_warps: int = 4):
  """The transposed tables (q_ids [B, H, nK, W'], q_count [B, H, nK]) of kv
  tables (kv_ids [B, H, nQ, W], kv_count [B, H, nQ]) in one kernel, one
  program a key block: block_tables.with_q_tables' lists, which XLA builds in
  six kernels (a scatter into a block mask, a sort, ...: 17 us at 4k tokens
  on an H200, where this kernel takes 3.3 us; docs/results.md). W' is nQ
  rounded up to a power of two; entries past a count repeat its last id (0
  if empty)."""
  b, h, n_q, _ = kv_ids.shape
  if kv_count.shape != (b, h, n_q) or n_k < 1:
    raise ValueError(f'q_tables: {kv_ids.shape=} and {kv_count.shape=} disagree '
                     f'(want [B, H, nQ, W] and [B, H, nQ]), or {n_k=} < 1')
  ids = tc.pad_ids(kv_ids)
  width, out_width = ids.shape[-1], pl.next_power_of_2(n_q)
  chunk = max(1, min(out_width, 4096 // width))   # 4096 table entries a pass
  padded_q = -(-n_q // chunk) * chunk
  count = kv_count.astype(jnp.int32)
  if padded_q != n_q:   # tiles with an empty list
    ids = jnp.pad(ids, ((0, 0), (0, 0), (0, padded_q - n_q), (0, 0)))
    count = jnp.pad(count, ((0, 0), (0, 0), (0, padded_q - n_q)))
  return pl.pallas_call(
      functools.partial(_q_tables_kernel, chunk=chunk),
      grid=(b, h, n_k),
      in_specs=[pl.BlockSpec((None, None, padded_q, width), lambda bi, hi, j: (bi, hi, 0, 0)),
                pl.BlockSpec((None, None, padded_q), lambda bi, hi, j: (bi, hi, 0))],
      out_specs=[pl.BlockSpec((None, None, None, out_width), lambda bi, hi, j: (bi, hi, j, 0)),
                 pl.BlockSpec((None, None, None), lambda bi, hi, j: (bi, hi, j))],
      out_shape=[jax.ShapeDtypeStruct((b, h, n_k, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((b, h, n_k), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(ids, count)


def with_q_tables(tables: bt.BlockTables, n_k: int, *, interpret: bool = False):
  """block_tables.with_q_tables through q_tables: tables that lack the
  transposed ones get them from one kernel."""
  if tables.q_ids is not None:
    return tables
  q_ids, q_count = q_tables(tables.kv_ids, tables.kv_count, n_k, interpret=interpret)
  return tables._replace(q_ids=q_ids, q_count=q_count)
