"""FlashMM: ViT image tokens prepended to the text of a prefix-LM decoder (PaliGemma-style)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashmm_jax import ops
from flashmm_jax.models import decoder
from flashmm_jax.models import gate
from flashmm_jax.models import layers
from flashmm_jax.models import vision


def num_image_tokens(config):
  """Image tokens per example for a full config: (image_size / patch_size)^2."""
  return (config.data.image_size // config.model.vision.patch_size) ** 2


class Projector(nnx.Module):
  """2-layer GELU MLP from vision width into the LM width."""

  def __init__(self, vision_width, lm_width, cfg, *, rngs):
    self.fc1 = layers.Dense(vision_width, lm_width, ('embed', 'mlp'), cfg, rngs=rngs, use_bias=True)
    self.fc2 = layers.Dense(lm_width, lm_width, ('mlp', 'embed'), cfg, rngs=rngs, use_bias=True)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


def _shared_mlps(cfg, lm):
  """The LM MLPs the vision blocks reuse under config.model.share_vision_lm_mlp."""
  if not cfg.share_vision_lm_mlp:
    return None
  v, l = cfg.vision, cfg.lm
  if v.width != l.width or v.depth > l.depth:
    raise ValueError(
        'config.model.share_vision_lm_mlp needs vision width == lm width and vision depth <= '
        f'lm depth; got vision width={v.width} depth={v.depth}, lm width={l.width} depth={l.depth}')
  return [lm.blocks[i].mlp for i in range(v.depth)]


def _check_text(text, prefix_len, text_len, vocab_size):
  b = text.shape[0]
  if text.ndim != 2 or prefix_len.shape != (b,) or text_len.shape != (b,):
    raise ValueError(f'text must be [B, L] with prefix_len and text_len [B]; got text '
                     f'{text.shape}, prefix_len {prefix_len.shape}, text_len {text_len.shape}')
  if not isinstance(text, jax.core.Tracer):  # values are only known outside jit
    hi = int(np.max(text)) if text.size else 0
    if hi >= vocab_size or (text.size and int(np.min(text)) < 0):
      raise ValueError(f'text holds token id {hi} outside [0, vocab_size={vocab_size})')


class FlashMM(nnx.Module):
  """Vision encoder -> projector -> image tokens + text in one prefix-LM decoder.

  Image tokens and the text prefix (bos + prompt) attend to each other fully;
  answer tokens attend causally; text padding is never a key.
  """

  def __init__(self, model_config, image_size, *, rngs):
    cfg = model_config
    self.decoder = decoder.Decoder(cfg, rngs=rngs)
    self.projector = Projector(cfg.vision.width, cfg.lm.width, cfg, rngs=rngs)
    self.vision = vision.VisionEncoder(cfg, image_size, rngs=rngs,
                                       shared_mlps=_shared_mlps(cfg, self.decoder))
    self.num_image_tokens = (image_size // cfg.vision.patch_size) ** 2
    sparse = cfg.get('sparse')
    if sparse is not None and sparse.get('dense_text', False):
      # The text (prompt and answer) is what the answer is read from, and a few
      # percent of a high-resolution sequence: only the image's query tiles are pruned.
      gate.set_dense_from(self, self.num_image_tokens)

  def embed_image(self, image):
    """uint8 [B, n, n, 3] -> image tokens [B, N, lm width]."""
    return self.projector(self.vision(image))

  def __call__(self, image, text, prefix_len, text_len):
    """-> f32 logits [B, L, V] for the text positions; logit t predicts text[t+1]."""
    _check_text(text, prefix_len, text_len, self.decoder.vocab_size)
    if image.shape[0] != text.shape[0]:
      raise ValueError(f'image batch {image.shape[0]} != text batch {text.shape[0]}')
    n = self.num_image_tokens
    x = jnp.concatenate([self.embed_image(image), self.decoder.embed(text)], axis=1)
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = ops.attention.MaskSpec(q_offset=jnp.zeros((b,), jnp.int32),
                                  kv_len=(n + text_len).astype(jnp.int32),
                                  prefix_len=(n + prefix_len).astype(jnp.int32), causal=True)
    hidden, _ = self.decoder(x, positions, mask)
    return self.decoder.logits(hidden[:, n:])
