"""Block layout for block-sparse attention: tile sizes and compact block tables.

A block mask `[B, H, nQ, nK]` says which (query block, key block) tiles are
computed. H counts *kv* heads: the query heads of a GQA group share one
selection, so they read the same K/V tiles. Kernels do not want the dense mask;
they want, per query block, the short list of key blocks to visit (forward,
dq), and per key block the list of query blocks (a future dk/dv pass). This
module builds those lists with a stable sort and gathers (no Python loops
over data), so it runs under jit.
"""

import dataclasses
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


def tables_from_scores(scores: jax.Array, budget: jax.Array, max_k: int
                       ) -> tuple[jax.Array, jax.Array]:
  """kv tables straight from block scores `[..., nK]`, no block mask.

  Keeps per row the `budget[...]` highest-scoring blocks (at most the static
  `max_k`); a score of -inf is never kept, +inf always (forced blocks sort
  first). Returns (ids [..., max_k] ascending and padded as compact_rows
  does, count [...]). One top_k and a sort of max_k entries: cheaper on a GPU
  than ranking all nK blocks, which is what the gate's inference path wants.
  """
  n_k = scores.shape[-1]
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  vals, idx = jax.lax.top_k(scores, max_k)
  keep = (jnp.arange(max_k) < budget[..., None]) & (vals > -jnp.inf)
  count = keep.sum(axis=-1, dtype=jnp.int32)
  # Unkept slots sort last (n_k); then repeat the last valid id over them.
  ids = jnp.sort(jnp.where(keep, idx, n_k), axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  ids = jnp.where(keep.any(-1, keepdims=True), jnp.minimum(ids, last), 0)
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
