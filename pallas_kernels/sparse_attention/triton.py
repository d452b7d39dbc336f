"""Block-sparse attention forward, Pallas Triton-style (one program per
(batch, query head, query block)).

Each program loops (lax.fori_loop, online softmax in f32) over only the key
blocks listed for its (batch, kv head, query block) in `kv_ids[:kv_count]`
(see block_tables.py). The Triton backend has no scalar prefetch, so the tables
and the per-batch lengths are ordinary inputs whose blocks are one row / one
scalar per program; the kernel then indexes K/V with a dynamic slice.

Element masking (causal + bidirectional prefix + kv_len) is applied to every
visited tile; it is cheap next to the two dots, and it makes partial tiles exact
without the caller having to split full and partial blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.block_tables import BlockSizes

# Finite, so (mask - mask) is 0 rather than NaN when a row has seen no key yet.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _forward_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, kv_len_ref,
                    prefix_ref, o_ref, *, sm_scale, block_q, block_k):
  """q_ref [block_q, D]; k_ref/v_ref [S, D]; ids_ref [max_k]; the rest scalars."""
  q = q_ref[...]
  q_pos = pl.program_id(2) * block_q + jnp.arange(block_q)
  kv_len = kv_len_ref[...]
  prefix_len = prefix_ref[...]

  def visit(j, carry):
    acc, row_max, row_sum = carry
    start = pl.multiple_of(ids_ref[j] * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale

    k_pos = start + jnp.arange(block_k)
    visible = (k_pos[None, :] < kv_len) & (
        (k_pos[None, :] < prefix_len) | (k_pos[None, :] <= q_pos[:, None]))
    logits = jnp.where(visible, logits, MASK_VALUE)

    new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
    correction = jnp.exp(row_max - new_max)
    # Zero masked probabilities explicitly: in a row with no visible key so far
    # logits - new_max is 0, and exp would count masked keys as weight 1.
    p = jnp.where(visible, jnp.exp(logits - new_max[:, None]), 0.0)
    row_sum = correction * row_sum + jnp.sum(p, axis=-1)
    acc = correction[:, None] * acc + jnp.dot(
        p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, new_max, row_sum

  init = (jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
          jnp.full((block_q,), MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, _, row_sum = lax.fori_loop(0, count_ref[...], visit, init)
  # Rows that saw no visible key have acc == 0 and row_sum == 0: output 0.
  acc = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
  o_ref[...] = acc.astype(o_ref.dtype)


def _check_shapes(q, k, v, kv_ids, kv_count, block_sizes):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"{q.shape=}, {k.shape=}, {v.shape=} disagree")
  if hq % hkv:
    raise ValueError(f"{hq=} query heads must be a multiple of {hkv=} kv heads")
  if t % bq:
    raise ValueError(f"seq_len={t} must be a multiple of block_q={bq}")
  if s % bk:
    raise ValueError(f"kv_seq_len={s} must be a multiple of block_k={bk}")
  # Triton tiles must be powers of two, and its dots need >= 16 rows.
  for name, n in (("block_q", bq), ("block_k", bk), ("head_dim", d)):
    if n < 16 or n & (n - 1):
      raise ValueError(f"{name}={n} must be a power of two >= 16")
  if kv_ids.shape[:3] != (b, hkv, t // bq) or kv_count.shape != kv_ids.shape[:3]:
    raise ValueError(f"{kv_ids.shape=} / {kv_count.shape=} must start with "
                     f"(B, Hkv, nQ)={(b, hkv, t // bq)}")


@functools.partial(jax.jit, static_argnames=(
    "block_sizes", "sm_scale", "interpret", "num_warps", "num_stages"))
def sparse_attention(q, k, v, kv_ids, kv_count, kv_len, prefix_len, *,
                     block_sizes: BlockSizes, sm_scale: float | None = None,
                     interpret: bool = False, num_warps: int = 4,
                     num_stages: int = 2) -> jax.Array:
  """Block-sparse attention forward.

  q [B, T, Hq, D]; k, v [B, S, Hkv, D] (bf16 or f32); kv_ids [B, Hkv, nQ, max_k]
  and kv_count [B, Hkv, nQ] from build_block_tables; kv_len, prefix_len int [B].
  Returns [B, T, Hq, D] in q.dtype; same semantics as reference.py.
  """
  _check_shapes(q, k, v, kv_ids, kv_count, block_sizes)
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  bq, bk = block_sizes.block_q, block_sizes.block_k
  scale = d ** -0.5 if sm_scale is None else sm_scale

  # Triton loads need power-of-two sizes: widen the table by repeating the
  # last id (the loop never reads past kv_count, so the values do not matter).
  max_k = kv_ids.shape[-1]
  width = pl.next_power_of_2(max_k)
  kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0),) * 3 + ((0, width - max_k),),
                   mode="edge")

  kernel = functools.partial(_forward_kernel, sm_scale=scale, block_q=bq,
                             block_k=bk)
  q_spec = pl.BlockSpec((None, bq, None, d), lambda bi, h, i: (bi, i, h, 0))
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, h, i: (bi, 0, h // group, 0))
  in_specs = [
      q_spec, kv_spec, kv_spec,
      pl.BlockSpec((None, None, None, width), lambda bi, h, i: (bi, h // group, i, 0)),
      pl.BlockSpec((None, None, None), lambda bi, h, i: (bi, h // group, i)),
      pl.BlockSpec((None,), lambda bi, h, i: (bi,)),
      pl.BlockSpec((None,), lambda bi, h, i: (bi,)),
  ]
  return pl.pallas_call(
      kernel,
      grid=(b, hq, t // bq),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="sparse_attention_fwd",
  )(q, k, v, kv_ids, kv_count.astype(jnp.int32),
    jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32))
