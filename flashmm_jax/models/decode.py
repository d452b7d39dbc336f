"""Prefill + greedy decoding over a preallocated KV cache.

The cache is a plain pytree so a serving engine can own and page it: one dict
per LM block, k and v of [B, S, Hkv, D], and with model.sparse.decode the
gate's key-block statistics gate_max, gate_min, gate_sum, f32 [B, S / block_k,
Hkv, D] over the pre-rotary keys written so far, and each block's gate key
(gate_key, f32 [B, Hkv, S / block_k, gate_dim]), and, when the eval counts them,
the decode steps' blocks (gate.DECODE_COUNTS, f32 [B]). Row b's new token t sits at
absolute position image_tokens + prefix_len[b] + t, exactly where training put
it: ragged prompts need no left padding.
"""

import jax.numpy as jnp
from jax import lax

from flashmm_jax import ops
from flashmm_jax.models import gate


def init_cache(model, batch, length):
  """Empty KV cache for `length` positions, in the compute dtype. With sparse
  decode steps, length rounds up to whole key blocks (the kernels' unit)."""
  dec = model.decoder
  block = max((g.block_sizes.block_k for g in gate.gates(dec) if g.decode), default=1)
  length = -(-length // block) * block
  return [blk.attn.init_cache(batch, length, dec.dtype) for blk in dec.blocks]


def _prefill(model, image, text, prefix_len, cache):
  """Runs image + prompt through the decoder; returns (last prompt logits, cache)."""
  n = model.num_image_tokens
  x = jnp.concatenate([model.embed_image(image), model.decoder.embed(text)], axis=1)
  b, t = x.shape[:2]
  prefix = n + prefix_len
  # The whole prompt is the bidirectional prefix; prompt padding is not a key.
  mask = ops.attention.MaskSpec(q_offset=jnp.zeros((b,), jnp.int32), kv_len=prefix,
                                prefix_len=prefix, causal=True)
  hidden, cache = model.decoder(x, jnp.broadcast_to(jnp.arange(t), (b, t)), mask, cache)
  last = jnp.take_along_axis(hidden, (prefix - 1)[:, None, None], axis=1)
  return model.decoder.logits(last)[:, 0], cache


def _step(model, token, pos, prefix, cache):
  """One new token per row at absolute position pos [B] -> (logits [B, V], cache)."""
  mask = ops.attention.MaskSpec(q_offset=pos, kv_len=pos + 1, prefix_len=prefix, causal=True)
  hidden, cache = model.decoder(model.decoder.embed(token[:, None]), pos[:, None], mask, cache)
  return model.decoder.logits(hidden)[:, 0], cache


def generate(model, image, text, prefix_len, *, max_new_tokens, eos_id):
  """Greedy decode -> int32 [B, max_new_tokens]; after a row's eos, only eos.

  text: int32 [B, L] holding bos + prompt (padded); prefix_len [B] its lengths.
  Jit with max_new_tokens and eos_id static, e.g.
  nnx.jit(generate, static_argnames=('max_new_tokens', 'eos_id')).
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if text.ndim != 2 or prefix_len.shape != text.shape[:1]:
    raise ValueError(f'text must be [B, L] and prefix_len [B]; got {text.shape}, {prefix_len.shape}')
  b, length = text.shape
  prefix = (model.num_image_tokens + prefix_len).astype(jnp.int32)
  cache = init_cache(model, b, model.num_image_tokens + length + max_new_tokens)
  logits, cache = _prefill(model, image, text, prefix_len, cache)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

  def unfinished(state):
    t, _, done, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def next_token(state):
    t, tokens, done, cache = state
    logits, cache = _step(model, tokens[:, t - 1], prefix + t - 1, prefix, cache)
    token = jnp.where(done, eos_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
    return t + 1, tokens, done | (token == eos_id), cache

  state = (jnp.int32(1), tokens, first == eos_id, cache)
  _, tokens, _, cache = lax.while_loop(unfinished, next_token, state)
  _record_decode_counts(model, cache)
  return tokens


def _record_decode_counts(model, cache):
  """Each layer's sparse decode steps' counts (gate.set_count_decode),
  recorded once the loop is done (under nnx.capture: the eval's figures)."""
  for blk, layer_cache in zip(model.decoder.blocks, cache):
    if gate.DECODE_COUNTS[0] in layer_cache and blk.attn.sparse_decode(1, layer_cache):
      blk.attn.block_gate.record_decode_counts(layer_cache)
