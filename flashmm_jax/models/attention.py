"""Grouped-query self-attention over the ops.attention seam, with a KV cache.

With config.model.sparse.enabled, rotary (LM) layers carry a learned block gate
(models/gate.py) and run training and prefill through the block-sparse seam;
with config.model.sparse.decode, decode steps too.
"""

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from flashmm_jax import ops
from flashmm_jax.models import gate
from flashmm_jax.models import layers


def write_cache(cache, k, v, start):
  """Writes k, v [B, T, Hkv, D] into cache k, v [B, S, Hkv, D] at row b's start[b]."""
  put = jax.vmap(lambda buf, new, at: lax.dynamic_update_slice_in_dim(buf, new, at, axis=0))
  return dict(cache, k=put(cache['k'], k.astype(cache['k'].dtype), start),
              v=put(cache['v'], v.astype(cache['v'].dtype), start))


def _is_decode_step(length, cache):
  """One new token against a cache (more is a prefill: decode.py's contract)."""
  return cache is not None and length == 1


class Attention(nnx.Module):
  """Self-attention with Hq query heads sharing Hkv key/value heads.

  rope_base=None means no rotary embedding (the vision encoder). The sparse
  gate needs rotary (it rotates block summaries), so only LM layers get one.
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
    sparse = cfg.get('sparse')
    self.block_gate = (gate.BlockGate(num_heads, num_kv_heads, head_dim, cfg, rope_base, rngs=rngs)
                       if sparse is not None and sparse.enabled and rope_base is not None
                       else None)

  def init_cache(self, batch, length, dtype):
    """This layer's empty cache: k, v [B, S, Hkv, D], plus the gate's
    key-block statistics when its decode steps are sparse (length must then
    be a multiple of the gate's block_k)."""
    zeros = lambda: jnp.zeros((batch, length) + self.k.out_shape, dtype)
    cache = dict(k=zeros(), v=zeros())
    if self._keeps_key_stats():
      cache.update(self.block_gate.empty_key_stats(batch, length))
    return cache

  def __call__(self, x, positions, mask, cache=None):
    """x [B, T, W] at positions [B, T] -> ([B, T, W], cache).

    With a cache (dict k, v of [B, S, Hkv, D], see init_cache) the new keys
    are written at each row's mask.q_offset and the queries attend over the
    whole cache.
    """
    q_raw, k_raw, v = self.q(x), self.k(x), self.v(x)
    q, k = q_raw, k_raw
    if self.rope_base is not None:
      q = layers.rope(q, positions, self.rope_base)
      k = layers.rope(k, positions, self.rope_base)
    if cache is not None:
      cache = write_cache(cache, k, v, mask.q_offset)
    if self.sparse_decode(x.shape[1], cache):
      # The step folds its keys into the gate's cache entries itself.
      out, cache = self.block_gate.attend_decode(q_raw, k_raw, q, cache, mask)
      return self.o(out), cache
    if cache is not None and self._keeps_key_stats():
      # Dense prefills and steps too: later decode steps may be long enough to be sparse.
      cache = self.block_gate.fold_keys(cache, k_raw, mask)
    if self._sparse(x.shape[1], cache):
      # At a prefill (position 0) the cache holds nothing but these keys, so
      # attending over them alone equals attending over the cache.
      out = self.block_gate.attend(q_raw, k_raw, q, k, v, mask)
    else:
      if cache is not None:
        # Dense decode steps and dense prefills read the whole cache.
        k, v = cache['k'].astype(q.dtype), cache['v'].astype(q.dtype)
      out = ops.attention.attend(q, k, v, mask, implementation=self.implementation)
    return self.o(out), cache

  def _keeps_key_stats(self):
    """Whether this layer's cache holds key-block statistics for its gate."""
    return self.block_gate is not None and self.block_gate.decode

  def _sparse(self, length, cache):
    """Sparse path: a gate, a long enough sequence, and training or a prefill.

    A call with a cache and more than one token is a prefill from position 0
    (decode.py's contract); the sparse seam has no q_offset, so a chunked
    prefill at q_offset > 0 would need one first.
    """
    if self.block_gate is None or _is_decode_step(length, cache):
      return False
    return self.block_gate.applies(length)

  def sparse_decode(self, length, cache):
    """Sparse decode step: model.sparse.decode and a cache long enough for the
    sparse path (static, like the prefill's length test)."""
    return (_is_decode_step(length, cache) and self._keeps_key_stats()
            and self.block_gate.applies(cache['k'].shape[1]))
