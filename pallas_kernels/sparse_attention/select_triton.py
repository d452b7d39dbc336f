"""Block tables from block scores in one Pallas-Triton kernel.

block_tables.tables_from_scores' XLA methods build the kv tables in several
kernels (a top_k and a sort, or three compare-and-reduce passes, plus the
masking around them), each a launch of a few microseconds on a GPU; with the
score pooling, that selection stage is 0.05-0.06 ms of a 65%-sparse forward
at 4k-8k tokens whose kernel takes 0.22-0.36 ms (docs/results.md). Here one
program takes one row of scores: block_cutoff's radix select (the one the
fused decode kernel runs) finds the row's top-`budget` cutoff in lax.top_k's
order, then the kept ids go to their slots by a cumsum and a scatter.

The tables are tables_from_scores' exactly (tested against its other methods,
NaN and -0.0 included): the keys are block_tables.total_order_key, every real
entry competes for the budget, and -inf (and NaN) entries are never kept.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import block_cutoff
from pallas_kernels.sparse_attention import block_tables as bt


def _row_tables_kernel(scores_ref, budget_ref, ids_ref, count_ref, *, n_k):
  """One row: scores [W] (W >= n_k, a power of two; entries past n_k are
  padding), its budget, ids [max_k padded to a power of two] and count."""
  scores = scores_ref[...]
  idx = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
  keys = bt.total_order_key(scores)
  key, last = block_cutoff.top_k_cutoff(keys, idx < n_k, budget_ref[...])
  chosen = (keys > key) | ((keys == key) & (idx <= last))
  keep = chosen & (idx < n_k) & (scores > -jnp.inf)
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


@functools.partial(jax.jit, static_argnames=('max_k', 'interpret', 'num_warps'))
def tables_from_scores(scores: jax.Array, budget: jax.Array, max_k: int, *,
                       interpret: bool = False, num_warps: int = 4):
  """block_tables.tables_from_scores(scores, budget, max_k) in one kernel:
  (ids [..., max_k] int32 ascending, padded with the last id; count [...]).

  scores [..., nK] (any float dtype; compared in f32, which orders bf16 and
  f16 exactly); budget broadcasts to scores.shape[:-1]. One program a row.
  """
  n_k = scores.shape[-1]
  if not 1 <= max_k <= n_k:
    raise ValueError(f"{max_k=} must be in [1, {n_k=}]")
  lead = scores.shape[:-1]
  rows = math.prod(lead)
  width, out_width = pl.next_power_of_2(n_k), pl.next_power_of_2(max_k)
  # Triton blocks have power-of-two sizes: padding columns, never candidates.
  flat = jnp.pad(scores.astype(jnp.float32).reshape(rows, n_k), ((0, 0), (0, width - n_k)))
  cap = jnp.minimum(jnp.broadcast_to(jnp.asarray(budget, jnp.int32), lead), max_k)
  ids, count = pl.pallas_call(
      functools.partial(_row_tables_kernel, n_k=n_k),
      grid=(rows,),
      in_specs=[pl.BlockSpec((None, width), lambda r: (r, 0)),
                pl.BlockSpec((None,), lambda r: (r,))],
      out_specs=[pl.BlockSpec((None, out_width), lambda r: (r, 0)),
                 pl.BlockSpec((None,), lambda r: (r,))],
      out_shape=[jax.ShapeDtypeStruct((rows, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((rows,), jnp.int32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(flat, cap.reshape(rows))
  return ids[:, :max_k].reshape(*lead, max_k), count.reshape(lead)
