"""Plain-jnp block-sparse attention: the ground truth the kernels are tested on.

Dense on purpose (materialises [B, Hq, T, S] logits): it must be obviously
right, not fast. Semantics shared with the kernels:
  * tile (query block qb, key block kb) is computed iff block_mask[b, h_kv, qb, kb]
    (h_kv = query head // group size, GQA);
  * inside a computed tile, key j is visible to query i iff
    j < kv_len[b] and (j < prefix_len[b] or j <= i)   (causal + bidirectional prefix);
  * softmax in f32 over the visible keys; a query row with no visible key
    outputs 0 (not NaN, not the mean of V).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.block_tables import BlockSizes


def element_mask(t: int, s: int, kv_len: jax.Array,
                 prefix_len: jax.Array) -> jax.Array:
  """Boolean [B, T, S]: causal with a bidirectional prefix, cut at kv_len."""
  i = jnp.arange(t)[None, :, None]
  j = jnp.arange(s)[None, None, :]
  kv_len = jnp.asarray(kv_len)[:, None, None]
  prefix_len = jnp.asarray(prefix_len)[:, None, None]
  return (j < kv_len) & ((j < prefix_len) | (j <= i))


def expand_block_mask(block_mask: jax.Array, num_q_heads: int,
                      block_sizes: BlockSizes) -> jax.Array:
  """[B, Hkv, nQ, nK] block mask -> [B, Hq, T, S] element mask."""
  group = num_q_heads // block_mask.shape[1]
  m = jnp.repeat(block_mask.astype(jnp.bool_), group, axis=1)
  m = jnp.repeat(m, block_sizes.block_q, axis=2)
  return jnp.repeat(m, block_sizes.block_k, axis=3)


def reference_sparse_attention(q, k, v, block_mask, kv_len, prefix_len, *,
                               block_sizes: BlockSizes,
                               sm_scale: float | None = None) -> jax.Array:
  """q [B, T, Hq, D], k/v [B, S, Hkv, D], block_mask [B, Hkv, T/bq, S/bk].

  Returns [B, T, Hq, D] in q.dtype.
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{hq=} query heads must be a multiple of {hkv=} kv heads")
  expected = (b, hkv, t // block_sizes.block_q, s // block_sizes.block_k)
  if block_mask.shape != expected:
    raise ValueError(f"{block_mask.shape=} must be {expected=}")
  scale = d ** -0.5 if sm_scale is None else sm_scale

  # GQA: each query head reads its group's kv head.
  k = jnp.repeat(k, hq // hkv, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, hq // hkv, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale

  visible = (expand_block_mask(block_mask, hq, block_sizes)
             & element_mask(t, s, kv_len, prefix_len)[:, None])
  # Max over visible keys only; empty rows get 0 so the exp stays finite.
  row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  denom = p.sum(axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)     # empty row: p == 0 -> output 0
  out = jnp.einsum("bhts,bshd->bthd", p, v)
  return out.astype(q.dtype)
