"""Block-sparse attention backward, Pallas Triton: a dq kernel and a dk/dv kernel.

Both recompute p = exp(s - lse) tile by tile from the forward's row logsumexp,
with the same element mask as the forward, and with delta = rowsum(dO * O)
precomputed in jnp. Neither writes a block from two programs (accumulating an
output across a grid axis races on Triton), so:

  dq:    grid (B, Hq, nQ); each program loops over its kv_ids[:kv_count].
  dk/dv: grid (B, Hkv, nK); each program loops over the (query block, query
         head) pairs of its kv head -- q_ids[:q_count] times the G heads of
         the GQA group -- and sums the G heads' contributions in registers.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.sparse_attention import select_triton
from pallas_kernels.sparse_attention import triton_common as tc


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, count_ref,
               kv_len_ref, prefix_ref, dq_ref, *, sm_scale, block_q, block_k):
  """q_ref/do_ref [block_q, D]; k_ref/v_ref [S, D]; lse/delta [block_q]."""
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = pl.program_id(2) * block_q + jnp.arange(block_q)
  kv_len, prefix_len = kv_len_ref[...], prefix_ref[...]

  def visit(j, dq):
    start = pl.multiple_of(ids_ref[j] * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    seen = tc.visible(q_pos[:, None], start + jnp.arange(block_k)[None, :],
                      kv_len, prefix_len)
    p = jnp.where(seen, jnp.exp(tc.dot(q, k, trans_b=True) * sm_scale
                                - lse[:, None]), 0.0)
    ds = p * (tc.dot(do, v, trans_b=True) - delta[:, None])
    return dq + tc.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, count_ref[...], visit,
                     jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref,
                 count_ref, kv_len_ref, prefix_ref, dk_ref, dv_ref, *, sm_scale,
                 block_q, block_k, group):
  """k_ref/v_ref [block_k, D]; q_ref/do_ref [T, G, D]; lse/delta [G, T].

  Tiles are computed transposed ([block_k, block_q]) so that every dot is
  a @ b or a @ b.T, and dk/dv accumulate without transposing p.
  """
  k, v = k_ref[...], v_ref[...]
  k_pos = pl.program_id(2) * block_k + jnp.arange(block_k)
  kv_len, prefix_len = kv_len_ref[...], prefix_ref[...]

  def visit(n, carry):  # n enumerates (query block, head of the group) pairs
    dk, dv = carry
    # lax.div / lax.rem: n >= 0, and jnp's floor-division sign fix-ups are
    # extra ops for the Triton lowering.
    start = pl.multiple_of(ids_ref[lax.div(n, group)] * block_q, block_q)
    head = lax.rem(n, group)
    rows = pl.ds(start, block_q)
    q, do = q_ref[rows, head, :], do_ref[rows, head, :]
    lse, delta = lse_ref[head, rows], delta_ref[head, rows]
    seen = tc.visible((start + jnp.arange(block_q))[None, :], k_pos[:, None],
                      kv_len, prefix_len)
    p_t = jnp.where(seen, jnp.exp(tc.dot(k, q, trans_b=True) * sm_scale
                                  - lse[None, :]), 0.0)
    dv = dv + tc.dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (tc.dot(v, do, trans_b=True) - delta[None, :])
    dk = dk + tc.dot(ds_t.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count_ref[...] * group, visit, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _residual_rows(out, lse, d_out, d_lse):
  """(lse, delta) as the kernels read them, [B, Hq, T] f32 each.

  delta = rowsum(dO * O) - d_lse: d lse / d s = p, so a cotangent on the lse
  enters ds = p * (dp - delta) like a shift of delta. Rows with no visible key
  have lse -inf; every p there is masked, so any finite value does.
  """
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32),
                     out.astype(jnp.float32)) - d_lse
  return jnp.where(jnp.isfinite(lse), lse, 0.0), delta


def backward(q, k, v, tables, kv_len, prefix_len, out, lse, d_out, d_lse, st):
  """(dq, dk, dv) for triton.forward; shapes were checked by the caller."""
  lse, delta = _residual_rows(out, lse, d_out, d_lse)
  tables = select_triton.with_q_tables(tables, k.shape[1] // st.block_sizes.block_k,
                                      interpret=st.interpret)
  lens = (jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32))
  d_out = d_out.astype(q.dtype)
  dq = _dq(q, k, v, d_out, lse, delta, tables, lens, st)
  dk, dv = _dkdv(q, k, v, d_out, lse, delta, tables, lens, st)
  return dq, dk, dv


def _dq(q, k, v, d_out, lse, delta, tables, lens, st):
  b, t, hq, d = q.shape
  bq, bk = st.block_sizes.block_q, st.block_sizes.block_k
  kv_ids = tc.pad_ids(tables.kv_ids)
  q_spec, kv_spec, ids_spec, count_spec, row_spec = tc.query_tile_specs(
      q, k, bq, kv_ids.shape[-1])
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, ids_spec, count_spec,
              tc.batch_scalar_spec(), tc.batch_scalar_spec()]
  kernel = functools.partial(_dq_kernel, sm_scale=st.sm_scale, block_q=bq,
                             block_k=bk)
  return pl.pallas_call(
      kernel, grid=(b, hq, t // bq), in_specs=in_specs, out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=tc.compiler_params(d, st.num_warps, st.num_stages),
      interpret=st.interpret, name='sparse_attention_dq',
  )(q, k, v, d_out, lse, delta, kv_ids, tables.kv_count.astype(jnp.int32), *lens)


def _dkdv(q, k, v, d_out, lse, delta, tables, lens, st):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  bq, bk = st.block_sizes.block_q, st.block_sizes.block_k
  q_ids = tc.pad_ids(tables.q_ids)
  # The whole query sequence of one GQA group: heads h*G .. h*G+G-1.
  q_spec = pl.BlockSpec((None, t, group, d), lambda bi, h, j: (bi, 0, h, 0))
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda bi, h, j: (bi, j, h, 0))
  row_spec = pl.BlockSpec((None, group, t), lambda bi, h, j: (bi, h, 0))
  in_specs = [
      q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
      pl.BlockSpec((None, None, None, q_ids.shape[-1]),
                   lambda bi, h, j: (bi, h, j, 0)),
      pl.BlockSpec((None, None, None), lambda bi, h, j: (bi, h, j)),
      tc.batch_scalar_spec(), tc.batch_scalar_spec(),
  ]
  kernel = functools.partial(_dkdv_kernel, sm_scale=st.sm_scale, block_q=bq,
                             block_k=bk, group=group)
  return pl.pallas_call(
      kernel, grid=(b, hkv, s // bk), in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=tc.compiler_params(d, st.num_warps, st.num_stages),
      interpret=st.interpret, name='sparse_attention_dkdv',
  )(q, k, v, d_out, lse, delta, q_ids, tables.q_count.astype(jnp.int32), *lens)
