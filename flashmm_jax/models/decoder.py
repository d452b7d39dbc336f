"""Decoder-only language model: Gemma-like blocks, logits from the tied embedding."""

import jax.numpy as jnp
from flax import nnx

from flashmm_jax import ops
from flashmm_jax.models import attention
from flashmm_jax.models import layers


class DecoderBlock(nnx.Module):
  """Pre-norm block: RMSNorm -> GQA with rotary -> RMSNorm -> gated-GELU MLP."""

  def __init__(self, cfg, *, rngs):
    lm = cfg.lm
    self.norm1 = layers.RMSNorm(lm.width, cfg, rngs=rngs)
    self.attn = attention.Attention(lm.width, lm.num_heads, lm.num_kv_heads, lm.head_dim,
                                    cfg, rngs=rngs, rope_base=lm.rope_base)
    self.norm2 = layers.RMSNorm(lm.width, cfg, rngs=rngs)
    self.mlp = layers.GatedMLP(lm.width, lm.mlp_dim, cfg, rngs=rngs)

  def __call__(self, x, positions, mask, cache=None):
    h, cache = self.attn(self.norm1(x), positions, mask, cache)
    x += h
    return x + self.mlp(self.norm2(x)), cache


class Decoder(nnx.Module):
  """Token embedding, blocks and final norm; logits reuse the embedding (tied)."""

  def __init__(self, cfg, *, rngs):
    lm = cfg.lm
    if lm.num_heads % lm.num_kv_heads:
      raise ValueError(f'config.model.lm.num_heads={lm.num_heads} is not a multiple of '
                       f'config.model.lm.num_kv_heads={lm.num_kv_heads}')
    self.dtype, param_dtype = layers.dtypes(cfg)
    self.width = lm.width
    self.vocab_size = lm.vocab_size
    self.implementation = cfg.matmul
    self.remat = cfg.remat
    layers.check_remat(cfg.remat)
    # std 1/sqrt(width): unit-scale inputs after the sqrt(width) multiplier below,
    # unit-scale logits from the normalised final hidden state.
    init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'normal', in_axis=1, out_axis=0)
    self.embedding = layers.param(rngs, init, (lm.vocab_size, lm.width), ('vocab', 'embed'),
                                  param_dtype)
    self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(lm.depth)])
    self.norm = layers.RMSNorm(lm.width, cfg, rngs=rngs)

  def embed(self, tokens):
    """int [B, T] -> [B, T, width] in the compute dtype."""
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    return x * jnp.sqrt(self.width).astype(self.dtype)

  def __call__(self, x, positions, mask, cache=None):
    """Embedded inputs [B, T, W] -> (normalised hidden [B, T, W], cache).

    cache: None, or one dict(k, v) per block (see decode.init_cache).
    """
    run = layers.remat(lambda block, *args: block(*args), self.remat)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x, c = run(block, x, positions, mask, None if cache is None else cache[i])
      new_cache.append(c)
    return self.norm(x), (None if cache is None else new_cache)

  def logits(self, hidden):
    """[B, T, W] -> f32 [B, T, vocab] against the tied embedding."""
    out = ops.matmul.matmul(hidden, self.embedding[...].T, implementation=self.implementation)
    return out.astype(jnp.float32)
