"""Grouped-query self-attention over the ops.attention seam, with a KV cache."""

import jax
from jax import lax
from flax import nnx

from flashmm_jax import ops
from flashmm_jax.models import layers


def write_cache(cache, k, v, start):
  """Writes k, v [B, T, Hkv, D] into cache k, v [B, S, Hkv, D] at row b's start[b]."""
  put = jax.vmap(lambda buf, new, at: lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
  return dict(k=put(cache['k'], k.astype(cache['k'].dtype), start),
              v=put(cache['v'], v.astype(cache['v'].dtype), start))


class Attention(nnx.Module):
  """Self-attention with Hq query heads sharing Hkv key/value heads.

  rope_base=None means no rotary embedding (the vision encoder).
  """

  def __init__(self, width, num_heads, num_kv_heads, head_dim, cfg, *, rngs, rope_base=None):
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}')
    self.implementation = cfg.attention
    ops.attention.get(cfg.attention)  # fail at build time on an unknown name
    self.rope_base = rope_base
    self.q = layers.Dense(width, (num_heads, head_dim), ('embed', 'heads', 'head_dim'), cfg, rngs=rngs)
    self.k = layers.Dense(width, (num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), cfg, rngs=rngs)
    self.v = layers.Dense(width, (num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), cfg, rngs=rngs)
    self.o = layers.Dense((num_heads, head_dim), width, ('heads', 'head_dim', 'embed'), cfg, rngs=rngs)

  def __call__(self, x, positions, mask, cache=None):
    """x [B, T, W] at positions [B, T] -> ([B, T, W], cache).

    With a cache (dict k, v of [B, S, Hkv, D]) the new keys are written at
    each row's mask.q_offset and the queries attend over the whole cache.
    """
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope_base is not None:
      q = layers.rope(q, positions, self.rope_base)
      k = layers.rope(k, positions, self.rope_base)
    if cache is not None:
      cache = write_cache(cache, k, v, mask.q_offset)
      k, v = cache['k'].astype(q.dtype), cache['v'].astype(q.dtype)
    out = ops.attention.attend(q, k, v, mask, implementation=self.implementation)
    return self.o(out), cache
