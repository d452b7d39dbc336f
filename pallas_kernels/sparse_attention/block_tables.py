"""Block layout for block-sparse attention: tile sizes and compact block tables.

A block mask `[B, H, nQ, nK]` says which (query block, key block) tiles are
computed. H counts *kv* heads: the query heads of a GQA group share one
selection, so they read the same K/V tiles. Kernels do not want the dense mask;
they want, per query block, the short list of key blocks to visit (forward,
dq), and per key block the list of query blocks (the dk/dv pass). This
module builds those lists with a stable sort and gathers (no Python loops
over data), so it runs under jit; and holds what the Mosaic kernels share
about them (kernel_lengths, whole_below, split_loop).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Frozen (hashable) so it can be a static jit argument.

  block_q: query rows per tile (the Triton dots need >= 16 rows).
  block_k: key/value rows per tile; one entry of the block mask covers a
    block_q x block_k tile.
  """
  block_q: int = 32
  block_k: int = 32


class BlockTables(NamedTuple):
  """Compact tables, all int32. Unused slots repeat the last valid id (0 for
  an empty row) so a pipelined prefetch never reads an out-of-range block."""
  kv_ids: jax.Array    # [B, H, nQ, max_k] selected key blocks, ascending
  kv_count: jax.Array  # [B, H, nQ]        how many kv_ids are valid
  q_ids: jax.Array     # [B, H, nK, max_q] selected query blocks, ascending
  q_count: jax.Array   # [B, H, nK]


def compact_rows(mask: jax.Array, max_sel: int) -> tuple[jax.Array, jax.Array]:
  """For each row of a boolean `[..., n]` mask: (ids [..., max_sel], count).

  Rows with more than `max_sel` selected entries keep their first `max_sel`
  (ascending) and report count == max_sel: the caller picks `max_sel` so this
  does not happen (max_sel = n is always exact).
  """
  n = mask.shape[-1]
  if not 1 <= max_sel <= n:
    raise ValueError(f"{max_sel=} must be in [1, {n=}]")
  # A stable sort of "not selected" puts the selected indices first, in
  # ascending order; this is the jit-friendly replacement for a nonzero loop.
  order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True)
  order = order[..., :max_sel].astype(jnp.int32)
  count = jnp.minimum(mask.sum(axis=-1, dtype=jnp.int32), max_sel)
  # Pad: slot p beyond the count takes the last valid id (slot count-1).
  slot = jnp.arange(max_sel, dtype=jnp.int32)
  src = jnp.minimum(slot, jnp.maximum(count - 1, 0)[..., None])
  ids = jnp.take_along_axis(order, src, axis=-1)
  ids = jnp.where(count[..., None] > 0, ids, 0)
  return ids, count


def build_block_tables(block_mask: jax.Array, max_k: int | None = None,
                       max_q: int | None = None) -> BlockTables:
  """Tables for a boolean block mask `[B, H, nQ, nK]`.

  max_k / max_q are static table widths (default nK / nQ, i.e. exact). A
  smaller width saves memory when the selection is known to be bounded
  (e.g. top-k routing); rows over the bound are truncated, see compact_rows.
  """
  if block_mask.ndim != 4:
    raise ValueError(f"block_mask must be [B, H, nQ, nK], got {block_mask.shape=}")
  block_mask = block_mask.astype(jnp.bool_)
  n_q, n_k = block_mask.shape[-2:]
  kv_ids, kv_count = compact_rows(block_mask, n_k if max_k is None else max_k)
  q_ids, q_count = compact_rows(jnp.swapaxes(block_mask, -1, -2),
                                n_q if max_q is None else max_q)
  return BlockTables(kv_ids, kv_count, q_ids, q_count)


def block_mask_from_tables(ids: jax.Array, count: jax.Array, n: int) -> jax.Array:
  """Inverse of compact_rows: boolean `[..., n]` mask from (ids, count).

  A scatter, so memory stays O(rows * n) however wide the tables are.
  """
  lead, width = ids.shape[:-1], ids.shape[-1]
  valid = jnp.arange(width) < count[..., None]
  cols = jnp.where(valid, ids, n).reshape(-1, width)       # n = a dropped slot
  rows = jnp.arange(cols.shape[0])[:, None]
  mask = jnp.zeros((cols.shape[0], n + 1), jnp.bool_).at[rows, cols].set(True)
  return mask[:, :n].reshape(*lead, n)


def with_q_tables(tables: BlockTables, n_k: int) -> BlockTables:
  """Adds the transposed (per key block) tables the dk/dv pass reads, when
  only the forward's kv tables were built (tables_from_scores)."""
  if tables.q_ids is not None:
    return tables
  mask = block_mask_from_tables(tables.kv_ids, tables.kv_count, n_k)
  q_ids, q_count = compact_rows(jnp.swapaxes(mask, -1, -2), mask.shape[-2])
  return tables._replace(q_ids=q_ids, q_count=q_count)


SELECT_METHODS = ('top_k', 'rank', 'pallas')


def tables_from_scores(scores: jax.Array, budget: jax.Array, max_k: int,
                       method: str = 'top_k', padded: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """kv tables straight from block scores `[..., nK]`, no block mask.

  Keeps per row the `budget[...]` highest-scoring blocks (at most the static
  `max_k`); a score of -inf is never kept, +inf always (forced blocks sort
  first). Returns (ids [..., max_k] ascending and padded as compact_rows
  does, count [...]). padded: ids may be wider than max_k (their rows padded
  the same way), as 'pallas' writes them, saving a slice.

  method (all give identical tables; which is faster depends on the device):
    'top_k': one lax.top_k of max_k entries, then a sort of max_k entries.
    'rank':  no sort. Each block's rank in its row by pairwise comparison
      ([..., nK, nK] compares that XLA fuses into a reduction), then each
      kept block's slot and the ascending ids as two more such reductions
      ([..., nK, nK], [..., max_k, nK]); see _tables_by_rank. XLA:GPU fuses
      the compares into the reductions (nothing of size nK^2 stored, 5
      kernels for the tables); XLA:CPU stores them (its tree rewrite of
      reductions over more than 32 entries), so prefer 'top_k' on a CPU.
      Its nK^2 work tells on a GPU too: benchmarks/attention.py's selection
      took 0.05-0.07 ms with 'rank' at nK <= 128 on an H200 (faster than
      'top_k') but 0.59 ms at nK = 256 (16k keys, block_k 64), where 'top_k'
      took ~0.07 ms on an H100 (docs/results.md).
    'pallas': one Pallas-Triton kernel, one program a row
      (select_triton.tables_from_scores); on a CPU it runs in the Pallas
      interpreter, for tests.
  Ties go to the lower index and floats are ordered as lax.top_k orders them
  (total order: -0 < +0, NaN past +-inf by sign; a NaN is never kept but, as
  in top_k, may take a place in the budget).
  """
  n_k = scores.shape[-1]
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  if method == 'rank':
    return _tables_by_rank(scores, budget, max_k)
  if method == 'pallas':
    if jax.default_backend() not in ('gpu', 'cpu'):
      raise ValueError("method='pallas' needs a GPU (or a CPU, interpreted)")
    from pallas_kernels.sparse_attention import select_triton  # pylint: disable=g-import-not-at-top
    return select_triton.tables_from_scores(scores, budget, max_k, padded=padded,
                                            interpret=jax.default_backend() == 'cpu')
  if method != 'top_k':
    raise ValueError(f"{method=} must be one of {SELECT_METHODS}")
  vals, idx = jax.lax.top_k(scores, max_k)
  keep = (jnp.arange(max_k) < budget[..., None]) & (vals > -jnp.inf)
  count = keep.sum(axis=-1, dtype=jnp.int32)
  # Unkept slots sort last (n_k); then repeat the last valid id over them.
  ids = jnp.sort(jnp.where(keep, idx, n_k), axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  ids = jnp.where(keep.any(-1, keepdims=True), jnp.minimum(ids, last), 0)
  return ids, count


def total_order_key(scores: jax.Array) -> jax.Array:
  """An integer key ordered as lax.top_k orders `scores` (floats: the IEEE
  total order, -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN)."""
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    return scores
  wide, as_int = ((jnp.float64, jnp.int64) if scores.dtype == jnp.float64
                  else (jnp.float32, jnp.int32))
  bits = jax.lax.bitcast_convert_type(scores.astype(wide), as_int)
  # Negative floats: flip the magnitude bits so a larger magnitude is smaller.
  return bits ^ ((bits >> (8 * bits.dtype.itemsize - 1)) & jnp.iinfo(as_int).max)


def top_k_rank(key, candidates=None):
  """int32 [..., N]: how many entries (of `candidates`, bool [..., N]; default
  all) come before each one in lax.top_k's order of `key` (total_order_key):
  higher first, ties to the lower index. One [N, N] compare and a sum; XLA
  fuses the compare into the reduction, and in a kernel it stays in registers."""
  idx = jnp.arange(key.shape[-1], dtype=jnp.int32)
  return count_ahead(key, idx, key, idx, candidates)


def ahead(key, idx, other_key, other_idx):
  """bool [..., N, M]: whether other j (other_key, other_idx [..., M]) comes
  before entry i (key, idx [..., N]) in lax.top_k's order: higher key first,
  ties to the lower index."""
  ki, kj = key[..., :, None], other_key[..., None, :]
  return (kj > ki) | ((kj == ki) & (other_idx[..., None, :] < idx[..., :, None]))


def count_ahead(key, idx, other_key, other_idx, candidates=None):
  """int32 [..., N]: how many of the M others (other_key, other_idx [..., M];
  of `candidates`, bool [..., M], default all) come before each entry (key,
  idx [..., N]) in lax.top_k's order (ahead). top_k_rank is a row against
  itself; a kernel ranking part of a row against all of it passes the two
  parts. One [N, M] compare and a sum."""
  beats = ahead(key, idx, other_key, other_idx)
  if candidates is not None:
    beats &= candidates[..., None, :]
  return beats.sum(axis=-1, dtype=jnp.int32)


def _tables_by_rank(scores, budget, max_k):
  """tables_from_scores(method='rank'): a sort-free top-k in three fused
  compare-and-reduce passes, each over a broadcast compare that XLA fuses
  into the reduction (no [.., nK, nK] operand is stored on a GPU):

    rank_i = #{j : s_j beats s_i}  (higher, or equal with j < i: top_k's order)
    keep_i = rank_i < min(budget, max_k) and s_i > -inf
    pos_i  = #{kept j < i}         (the slot of a kept block; a cumsum would be
                                    a reduce-window scan of several kernels)
    ids[t] = max{i : kept, pos_i <= t}, 0 if none

  The max gives the kept block in slot t, then the last kept id past the
  count, and 0 for an empty row: compact_rows' padding without the count.
  """
  n_k = scores.shape[-1]
  idx = jnp.arange(n_k, dtype=jnp.int32)
  rank = top_k_rank(total_order_key(scores))
  cap = jnp.minimum(jnp.asarray(budget, jnp.int32), max_k)
  keep = (rank < cap[..., None]) & (scores > -jnp.inf)
  count = keep.sum(axis=-1, dtype=jnp.int32)
  # Written against an index (w_j = j if kept, else past the end) rather than
  # keep_j & (j < i): a compare of two iotas gets hoisted by XLA:GPU into a
  # kernel of its own that stores the [nK, nK] mask.
  kept_at = jnp.where(keep, idx, n_k)
  pos = (kept_at[..., None, :] < idx[:, None]).sum(axis=-1, dtype=jnp.int32)
  slot = jnp.where(keep, pos, max_k)                     # max_k: no slot
  t = jnp.arange(max_k, dtype=jnp.int32)
  ids = jnp.max(jnp.where(slot[..., None, :] <= t[:, None], idx, 0), axis=-1)
  return ids, count


def check_qkv(q, k, v):
  """q [B, T, Hq, D] and k, v [B, S, Hkv, D] agree, and Hkv divides Hq (GQA)."""
  b, _, hq, d = q.shape
  hkv = k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or v.dtype != k.dtype:
    raise ValueError(f"{q.shape=}, {k.shape=}, {v.shape=} disagree")
  if hq % hkv:
    raise ValueError(f"{hq=} query heads must be a multiple of {hkv=} kv heads")


def check_block_multiples(q, k, block_sizes: BlockSizes):
  """Query and key lengths are whole numbers of blocks."""
  t, s = q.shape[1], k.shape[1]
  if t % block_sizes.block_q:
    raise ValueError(f"seq_len={t} must be a multiple of block_q={block_sizes.block_q}")
  if s % block_sizes.block_k:
    raise ValueError(f"kv_seq_len={s} must be a multiple of block_k={block_sizes.block_k}")


def check_kv_tables(tables: BlockTables, q, k, block_q: int):
  """The forward's tables start with (B, Hkv, T / block_q)."""
  want = (q.shape[0], k.shape[2], q.shape[1] // block_q)
  if tables.kv_ids.shape[:3] != want:
    raise ValueError(f"{tables.kv_ids.shape=} must start with (B, Hkv, nQ)={want}")


class KernelLengths(NamedTuple):
  """kv_len and prefix_len as a Mosaic kernel takes them. A length left out
  (None: every key valid / no prefix) is a static int, so no constant array
  is passed (XLA would spend a broadcast kernel a call building it); the
  given ones are [B] int32 arrays, passed after the kernel's other inputs."""
  static: tuple        # (kv_len, prefix_len): an int where left out, else None
  arrays: tuple        # the given lengths, [B] int32

  def reader(self, refs):
    """b -> (kv_len, prefix_len) inside a kernel, from the refs of `arrays`."""
    given = iter(refs)
    both = [c if c is not None else next(given) for c in self.static]
    return lambda b: tuple(x if isinstance(x, int) else x[b] for x in both)


def kernel_lengths(kv_len, prefix_len, kv_seq: int) -> KernelLengths:
  """KernelLengths of [B] kv_len / prefix_len, each possibly None."""
  static = (kv_seq if kv_len is None else None, 0 if prefix_len is None else None)
  arrays = tuple(jnp.asarray(x, jnp.int32) for x in (kv_len, prefix_len) if x is not None)
  return KernelLengths(static, arrays)


def whole_below(first_row, kv_len, prefix_len):
  """The key below which every query row from first_row on sees every key:
  keys below kv_len, and in the prefix or at most the row. A tile whose keys
  end at or below it needs no element mask. It rises with first_row, so in an
  ascending kv list the mask-free blocks come first, in an ascending q list
  the masked tiles."""
  return jnp.minimum(kv_len, jnp.maximum(prefix_len, first_row + 1))


def split_loop(step, carry, n, id_at, in_first_run, first_masked):
  """step(j, carry, masked) for j in [0, n) over an ascending table, in a
  Mosaic kernel: masked=first_masked while in_first_run(id_at(j)), then the
  other kind for the rest (whole_below says why the kinds form two runs).
  The kernel finds the split itself, so no count of either run is built
  before it; id_at(j + 1) loads during step j and is tested after it.
  id_at must accept j = n (a clamped read)."""
  def first_run(state):
    j, _, carry = state
    next_id = id_at(j + 1)
    return j + 1, next_id, step(j, carry, masked=first_masked)

  def still_first(state):
    j, block, _ = state
    return (j < n) & in_first_run(block)

  j, _, carry = jax.lax.while_loop(still_first, first_run, (jnp.int32(0), id_at(0), carry))
  return jax.lax.fori_loop(j, n, functools.partial(step, masked=not first_masked), carry)
