"""ViT encoder: patches -> tokens with fixed 2-D sincos positions -> pre-norm blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashmm_jax import ops
from flashmm_jax.models import attention
from flashmm_jax.models import layers


def sincos_2d(grid, width):
  """Fixed [grid*grid, width] position embedding: sin/cos of row and column."""
  if width % 4:
    raise ValueError(f'vision width {width} must be a multiple of 4 for 2-D sincos positions')
  omega = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y, x = np.mgrid[:grid, :grid]
  y = y.reshape(-1, 1) * omega
  x = x.reshape(-1, 1) * omega
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def patchify(images, patch):
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major over the patch grid."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ConvDown(nnx.Module):
  """3x3 stride-2 convolution, LayerNorm over channels, GELU."""

  def __init__(self, c_in, c_out, cfg, *, rngs):
    self.dtype, param_dtype = layers.dtypes(cfg)
    init = nnx.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal',
                                             in_axis=(0, 1, 2), out_axis=3)
    self.kernel = layers.param(rngs, init, (3, 3, c_in, c_out), (None,) * 4, param_dtype)
    self.norm = layers.LayerNorm(c_out, cfg, rngs=rngs)

  def __call__(self, x):
    x = jax.lax.conv_general_dilated(x, self.kernel[...].astype(self.dtype), (2, 2), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.nn.gelu(self.norm(x))


def conv_stem_channels(patch, width):
  """Channels of the conv stem: 3 -> 64 -> 128 ... (capped at width), one stride-2 step
  per factor of two in the patch size."""
  steps = round(math.log2(patch))
  if 2 ** steps != patch:
    raise ValueError(f"config.model.vision.stem='conv' needs a power-of-two patch_size, "
                     f'got {patch}')
  return [3] + [min(width, 32 * 2 ** i) for i in range(1, steps + 1)]


class ConvStem(nnx.Module):
  """Stride-2 convolutions down to the patch grid, then a linear map to the width.

  Early convolutions make a ViT optimise faster and see small shapes better than
  one linear patch embedding (Xiao et al. 2021, "Early convolutions help
  transformers see better") for a small share of the FLOPs.
  """

  def __init__(self, patch, width, cfg, *, rngs):
    channels = conv_stem_channels(patch, width)
    self.convs = nnx.List([ConvDown(a, b, cfg, rngs=rngs)
                           for a, b in zip(channels[:-1], channels[1:])])
    self.proj = layers.Dense(channels[-1], width, ('patch', 'embed'), cfg, rngs=rngs,
                             use_bias=True)

  def __call__(self, x):
    for conv in self.convs:
      x = conv(x)
    b, h, w, c = x.shape
    return self.proj(x.reshape(b, h * w, c))


class PatchStem(nnx.Module):
  """One linear map of each flattened patch (the classic ViT embedding)."""

  def __init__(self, patch, width, cfg, *, rngs):
    self.patch = patch
    self.proj = layers.Dense(patch ** 2 * 3, width, ('patch', 'embed'), cfg, rngs=rngs,
                             use_bias=True)

  def __call__(self, x):
    return self.proj(patchify(x, self.patch))


STEMS = {'patch': PatchStem, 'conv': ConvStem}


class VisionBlock(nnx.Module):
  """Pre-norm transformer block with full (non-causal) attention."""

  def __init__(self, vcfg, cfg, *, rngs, mlp=None):
    w = vcfg.width
    self.norm1 = layers.LayerNorm(w, cfg, rngs=rngs)
    self.attn = attention.Attention(w, vcfg.num_heads, vcfg.num_heads, w // vcfg.num_heads,
                                    cfg, rngs=rngs)
    self.norm2 = layers.LayerNorm(w, cfg, rngs=rngs)
    # With config.model.share_vision_lm_mlp this is the LM block's MLP object.
    self.mlp = mlp if mlp is not None else layers.MLP(w, vcfg.mlp_dim, cfg, rngs=rngs)

  def __call__(self, x, positions, mask):
    x += self.attn(self.norm1(x), positions, mask)[0]
    return x + self.mlp(self.norm2(x))


class VisionEncoder(nnx.Module):
  """uint8 images [B, n, n, 3] -> tokens [B, (n/patch)^2, width]."""

  def __init__(self, cfg, image_size, *, rngs, shared_mlps=None):
    v = cfg.vision
    if image_size % v.patch_size:
      raise ValueError(f'image_size={image_size} is not a multiple of '
                       f'config.model.vision.patch_size={v.patch_size}')
    self.image_size = image_size
    self.patch = v.patch_size
    self.dtype, _ = layers.dtypes(cfg)
    self.remat = cfg.remat
    layers.check_remat(cfg.remat)
    stem = v.get('stem', 'patch')
    if stem not in STEMS:
      raise ValueError(f'Unknown config.model.vision.stem {stem!r}; valid: {sorted(STEMS)}')
    self.embed = STEMS[stem](v.patch_size, v.width, cfg, rngs=rngs)
    shared_mlps = shared_mlps or [None] * v.depth
    self.blocks = nnx.List([VisionBlock(v, cfg, rngs=rngs, mlp=m) for m in shared_mlps])
    self.norm = layers.LayerNorm(v.width, cfg, rngs=rngs)

  def __call__(self, images):
    n = self.image_size
    if images.ndim != 4 or images.shape[1:] != (n, n, 3):
      raise ValueError(f'image of shape {images.shape} does not match [B, {n}, {n}, 3] '
                       f'(config.data.image_size={n})')
    if images.dtype != jnp.uint8:
      raise ValueError(f'image dtype is {images.dtype}; the batch contract is uint8 [0, 255]')
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = self.embed(x.astype(self.dtype))
    x += sincos_2d(n // self.patch, x.shape[-1]).astype(self.dtype)
    mask = ops.attention.MaskSpec.full(x.shape[0], x.shape[1])
    run = layers.remat(lambda block, x, mask: block(x, None, mask), self.remat)
    for block in self.blocks:
      x = run(block, x, mask)
    return self.norm(x)
