import numpy as np
from flax import nnx

from configs import flash
from flashmm_jax import models


def tiny_config(**model_overrides):
  """configs/flash.py:tiny with f32 everywhere and xla kernels (CPU tests)."""
  c = flash.get_config('tiny')
  c.model.attention = 'xla'
  c.model.dtype = 'float32'
  c.model.update(model_overrides)
  return c


def build(config, seed=0):
  return models.FlashMM(config.model, config.data.image_size, rngs=nnx.Rngs(seed))


def batch(config, b=3, length=12, seed=0):
  """Random batch following the data contract, with ragged prefixes and padding."""
  rng = np.random.default_rng(seed)
  n = config.data.image_size
  prefix_len = np.array([3, 5, 2, 4][:b], np.int32)
  text_len = np.array([12, 9, 6, 10][:b], np.int32)
  text = rng.integers(2, config.model.lm.vocab_size, (b, length)).astype(np.int32)
  text[np.arange(length)[None] >= text_len[:, None]] = 0
  image = rng.integers(0, 256, (b, n, n, 3)).astype(np.uint8)
  return dict(image=image, text=text, prefix_len=prefix_len, text_len=text_len)


# One compiled forward for every model of the same shapes.
forward = nnx.jit(lambda model, b: model(b['image'], b['text'], b['prefix_len'], b['text_len']))
