"""Block-sparse attention, Pallas Triton: forward kernel, public wrapper, and
the custom_vjp that routes gradients to triton_backward.py.

Forward: one program per (batch, query head, query block). It loops
(lax.fori_loop, online softmax in f32) over only the key blocks listed for its
(batch, kv head, query block) in `kv_ids[:kv_count]` (block_tables.py). The
Triton backend has no scalar prefetch, so the tables and the per-batch lengths
are ordinary inputs whose blocks are one row / one scalar per program, and the
kernel indexes K/V with a dynamic slice. GQA is an index map: query head h reads
kv head h // G.

Element masking (causal + bidirectional prefix + kv_len) is applied to every
visited tile; it is cheap next to the two dots, and it makes partial tiles exact
without the caller having to split full and partial blocks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.sparse_attention import triton_backward
from pallas_kernels.sparse_attention import triton_common as tc
from pallas_kernels.sparse_attention.block_tables import (
    BlockSizes, BlockTables, check_block_multiples, check_qkv)


@dataclasses.dataclass(frozen=True)
class Static:
  """The hashable, non-differentiable arguments of one call."""
  block_sizes: BlockSizes
  sm_scale: float
  interpret: bool
  num_warps: int | None
  num_stages: int


def _forward_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, kv_len_ref,
                    prefix_ref, o_ref, lse_ref, *, sm_scale, block_q, block_k):
  """q_ref [block_q, D]; k_ref/v_ref [S, D]; ids_ref [max_k]; lse_ref [block_q]."""
  q_pos = pl.program_id(2) * block_q + jnp.arange(block_q)
  out, lse = tc.attend_blocks(
      q_ref[...], k_ref, v_ref, ids_ref, 0, count_ref[...], q_pos,
      kv_len_ref[...], prefix_ref[...], sm_scale=sm_scale, block_k=block_k)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def check_shapes(q, k, v, tables: BlockTables, block_sizes: BlockSizes):
  b, t, _, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  check_qkv(q, k, v)
  check_block_multiples(q, k, block_sizes)
  tc.check_pow2(block_q=bq, block_k=bk, head_dim=d)
  for name, ids, count, n in (('kv', tables.kv_ids, tables.kv_count, t // bq),
                              ('q', tables.q_ids, tables.q_count, s // bk)):
    if name == 'q' and ids is None:   # kv tables only: the backward adds q tables
      continue
    if ids.shape[:3] != (b, hkv, n) or count.shape != ids.shape[:3]:
      raise ValueError(f'tables {name}_ids {ids.shape} / {name}_count {count.shape} '
                       f'must start with {(b, hkv, n)}')


def forward(q, k, v, tables, kv_len, prefix_len, st: Static):
  """(out [B, T, Hq, D] in q.dtype, lse [B, Hq, T] f32); not differentiable."""
  b, t, hq, d = q.shape
  bq, bk = st.block_sizes.block_q, st.block_sizes.block_k
  kv_ids = tc.pad_ids(tables.kv_ids)
  q_spec, kv_spec, ids_spec, count_spec, row_spec = tc.query_tile_specs(
      q, k, bq, kv_ids.shape[-1])
  in_specs = [q_spec, kv_spec, kv_spec, ids_spec, count_spec,
              tc.batch_scalar_spec(), tc.batch_scalar_spec()]
  out_specs = [q_spec, row_spec]
  kernel = functools.partial(_forward_kernel, sm_scale=st.sm_scale, block_q=bq,
                             block_k=bk)
  return pl.pallas_call(
      kernel,
      grid=(b, hq, t // bq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
      compiler_params=tc.compiler_params(d, st.num_warps, st.num_stages),
      interpret=st.interpret,
      name='sparse_attention_fwd',
  )(q, k, v, kv_ids, tables.kv_count.astype(jnp.int32),
    jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32))


# ------------------------------------------------------------ custom_vjp ---

@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, tables, kv_len, prefix_len, st):
  return forward(q, k, v, tables, kv_len, prefix_len, st)


def _attention_fwd(q, k, v, tables, kv_len, prefix_len, st):
  out, lse = forward(q, k, v, tables, kv_len, prefix_len, st)
  return (out, lse), (q, k, v, tables, kv_len, prefix_len, out, lse)


def _attention_bwd(st, residuals, cotangents):
  q, k, v, tables, kv_len, prefix_len, out, lse = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = triton_backward.backward(q, k, v, tables, kv_len, prefix_len, out,
                                        lse, d_out, d_lse, st)
  # Tables and lengths are integers: no cotangent.
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=(
    'block_sizes', 'sm_scale', 'interpret', 'num_warps', 'num_stages',
    'return_lse'))
def sparse_attention(q, k, v, tables: BlockTables, kv_len, prefix_len, *,
                     block_sizes: BlockSizes, sm_scale: float | None = None,
                     interpret: bool = False, num_warps: int | None = None,
                     num_stages: int = 2, return_lse: bool = False):
  """Block-sparse attention, differentiable w.r.t. q, k, v.

  q [B, T, Hq, D]; k, v [B, S, Hkv, D] (bf16 or f32); tables from
  build_block_tables over a [B, Hkv, T/block_q, S/block_k] block mask (exact
  widths, or kv and q tables truncated alike: the forward reads kv_ids, the
  dk/dv pass reads q_ids); kv_len, prefix_len int [B]. Semantics as in
  reference.py. Returns out [B, T, Hq, D] in q.dtype, and with return_lse also
  the row logsumexp [B, Hq, T] f32 (-inf for rows with no visible key; its
  gradient is supported too). num_warps None: 4 for D <= 64, else 8.
  """
  check_shapes(q, k, v, tables, block_sizes)
  scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  st = Static(block_sizes, scale, interpret, num_warps, num_stages)
  out, lse = _attention(q, k, v, tables, kv_len, prefix_len, st)
  return (out, lse) if return_lse else out
