"""Block-sparse decode attention, Pallas Triton: flash-decoding over the key
blocks a (batch, kv head) selected.

A decode step has M new tokens (M small, 1-8) per batch row. The G query heads
of one GQA group read the same K/V blocks, so the G x M (token, head) pairs of
a group are the rows of one tile -- row r = m * G + g, padded to a power of two
>= 16 because Triton dots need 16 rows -- and each K/V block is loaded once
for all of them.

One block list is far too little work for one program, so the list is split
(flash-decoding): grid (B, Hkv, splits); split i takes the i-th contiguous
slice of kv_ids[b, h, :kv_count[b, h]], slices of ceil(count / splits) blocks,
so the slices of a row differ by at most one block. Each split writes its
normalised partial output and row logsumexp; `combine` (jnp) merges them.

Masking: new token m sits at absolute position q_offset[b] + m and sees key j
iff j < kv_len[b] and (j < prefix_len[b] or j <= q_offset[b] + m).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.sparse_attention import triton_common as tc
from pallas_kernels.sparse_attention.block_tables import block_mask_from_tables, check_qkv


def _decode_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, pos_ref, kv_len_ref,
                   prefix_ref, o_ref, lse_ref, *, sm_scale, block_k, num_splits):
  """q_ref [R, D]; k_ref/v_ref [S, D]; ids_ref [max_k]; pos_ref [R] positions."""
  count = count_ref[...]
  chunk = lax.div(count + num_splits - 1, num_splits)   # count >= 0
  lo = jnp.minimum(pl.program_id(2) * chunk, count)
  hi = jnp.minimum(lo + chunk, count)
  out, lse = tc.attend_blocks(
      q_ref[...], k_ref, v_ref, ids_ref, lo, hi, pos_ref[...], kv_len_ref[...],
      prefix_ref[...], sm_scale=sm_scale, block_k=block_k)
  o_ref[...] = out
  lse_ref[...] = lse


def combine(out, lse, axis):
  """Merge split-K partials: out [..., R, D] normalised per split, lse [..., R].

  Splits that saw no visible key have lse -inf and weigh 0; a row no split
  saw stays 0.
  """
  top = jnp.max(lse, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp(lse - top)                                  # 0 where -inf
  total = jnp.sum(weight, axis=axis)
  merged = jnp.sum(weight[..., None] * out, axis=axis)
  return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _check_shapes(q, k_cache, v_cache, kv_ids, kv_count, block_k):
  b, d = q.shape[0], q.shape[3]
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  check_qkv(q, k_cache, v_cache)
  if s % block_k:
    raise ValueError(f'cache length {s} must be a multiple of {block_k=}')
  tc.check_pow2(block_k=block_k, head_dim=d)
  if kv_ids.ndim != 3 or kv_ids.shape[:2] != (b, hkv) or kv_count.shape != (b, hkv):
    raise ValueError(f'{kv_ids.shape=} / {kv_count.shape=} must be '
                     f'(B, Hkv, max_k) / (B, Hkv) with (B, Hkv)={(b, hkv)}')


def _group_rows(q, hkv):
  """[B, M, Hq, D] -> [B, Hkv, R, D], row m * G + g, zero rows up to R."""
  b, m, hq, d = q.shape
  rows = m * (hq // hkv)
  q = q.reshape(b, m, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
  q = q.reshape(b, hkv, rows, d)
  padded = max(16, pl.next_power_of_2(rows))
  return jnp.pad(q, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))


@functools.partial(jax.jit, static_argnames=(
    'block_k', 'num_splits', 'sm_scale', 'interpret', 'num_warps', 'num_stages'))
def sparse_decode(q, k_cache, v_cache, kv_ids, kv_count, kv_len, prefix_len,
                  q_offset, *, block_k: int, num_splits: int | None = None,
                  sm_scale: float | None = None, interpret: bool = False,
                  num_warps: int | None = None, num_stages: int = 2):
  """Decode attention over selected cache blocks; [B, M, Hq, D] in q.dtype.

  q [B, M, Hq, D] new tokens; k_cache, v_cache [B, S, Hkv, D]; kv_ids
  [B, Hkv, max_k] selected key blocks (of block_k keys), kv_count [B, Hkv];
  kv_len, prefix_len, q_offset int [B]. num_splits None: enough splits for
  ~256 programs, at most max_k. Rows with no visible key output 0.
  """
  _check_shapes(q, k_cache, v_cache, kv_ids, kv_count, block_k)
  b, m, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  group = hq // hkv
  max_k = kv_ids.shape[-1]
  splits = num_splits or min(max_k, pl.cdiv(256, b * hkv))
  scale = d ** -0.5 if sm_scale is None else sm_scale

  q_rows = _group_rows(q, hkv)
  rows = q_rows.shape[2]
  # Position of row r: token min(r // G, M - 1); padding rows are sliced off.
  token = jnp.minimum(jnp.arange(rows) // group, m - 1)
  pos = jnp.asarray(q_offset, jnp.int32)[:, None] + token[None, :]      # [B, R]

  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, h, i: (bi, 0, h, 0))
  ids = tc.pad_ids(kv_ids)
  in_specs = [
      pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, 0, 0)),
      kv_spec, kv_spec,
      pl.BlockSpec((None, None, ids.shape[-1]), lambda bi, h, i: (bi, h, 0)),
      pl.BlockSpec((None, None), lambda bi, h, i: (bi, h)),
      pl.BlockSpec((None, rows), lambda bi, h, i: (bi, 0)),
      tc.batch_scalar_spec(), tc.batch_scalar_spec(),
  ]
  out_specs = [
      pl.BlockSpec((None, None, None, rows, d), lambda bi, h, i: (bi, h, i, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda bi, h, i: (bi, h, i, 0)),
  ]
  kernel = functools.partial(_decode_kernel, sm_scale=scale, block_k=block_k,
                             num_splits=splits)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, hkv, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
      compiler_params=tc.compiler_params(d, num_warps, num_stages),
      interpret=interpret,
      name='sparse_decode',
  )(q_rows, k_cache, v_cache, ids, kv_count.astype(jnp.int32), pos,
    jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32))
  out = combine(out, lse, axis=2)[:, :, :m * group]               # [B, Hkv, M*G, D]
  out = out.reshape(b, hkv, m, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, m, hq, d).astype(q.dtype)


def sparse_decode_reference(q, k_cache, v_cache, kv_ids, kv_count, kv_len,
                            prefix_len, q_offset, *, block_k: int,
                            sm_scale: float | None = None):
  """Plain-jnp, dense ([B, Hkv, G, M, S] logits) ground truth for sparse_decode."""
  b, m, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  blocks = block_mask_from_tables(kv_ids, kv_count, s // block_k)  # [B, Hkv, nK]
  keys = jnp.repeat(blocks, block_k, axis=-1)[:, :, None, None]      # [B,Hkv,1,1,S]
  col = lambda x: jnp.asarray(x, jnp.int32)[:, None, None]
  pos = col(q_offset) + jnp.arange(m)[None, :, None]                 # [B, M, 1]
  j = jnp.arange(s)
  elem = (j < col(kv_len)) & ((j < col(prefix_len)) | (j <= pos))  # [B, M, S]
  seen = keys & elem[:, None, None]

  qg = q.reshape(b, m, hkv, hq // hkv, d).astype(jnp.float32)
  logits = jnp.einsum('bmhgd,bshd->bhgms', qg, k_cache.astype(jnp.float32)) * scale
  top = jnp.max(jnp.where(seen, logits, -jnp.inf), axis=-1, keepdims=True)
  p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bhgms,bshd->bmhgd', p, v_cache.astype(jnp.float32))
  return out.reshape(b, m, hq, d).astype(q.dtype)
