"""Building blocks shared by the vision encoder and the language model.

Params live in `param_dtype`; activations in the compute `dtype`. Every param
names its logical axes (see LOGICAL_AXES); the mesh mapping is config, not code.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

from flashmm_jax import ops

# The only logical axis names a param may carry (configs.common maps them).
LOGICAL_AXES = ('embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab', 'patch', None)

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def dtypes(cfg):
  """(compute dtype, param dtype) of a model config."""
  return jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)


def param(rngs, init, shape, names, dtype):
  """An nnx.Param with logical axis names on every dimension."""
  if len(names) != len(shape) or any(n not in LOGICAL_AXES for n in names):
    raise ValueError(f'param of shape {shape} has axis names {names}; '
                     f'each dimension needs one of {LOGICAL_AXES}')
  # Shard at creation only under a mesh (jax.set_mesh); without one (CPU tests,
  # eval_shape) the names are kept as metadata for the trainer to apply.
  init = nnx.with_partitioning(init, tuple(names), eager_sharding=meta.global_mesh_defined())
  return nnx.Param(init(rngs.params(), tuple(shape), dtype))


def check_remat(policy_name):
  if policy_name != 'none' and policy_name not in REMAT_POLICIES:
    raise ValueError(f'Unknown config.model.remat {policy_name!r}; '
                     f"valid: {['none', *REMAT_POLICIES]}")


def remat(fn, policy_name):
  """fn under nnx.remat with the config's policy; 'none' leaves it as is."""
  check_remat(policy_name)
  if policy_name == 'none':
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[policy_name])


class Dense(nnx.Module):
  """x[..., *in_shape] @ kernel[*in_shape, *out_shape] through the matmul seam."""

  def __init__(self, in_shape, out_shape, names, cfg, *, rngs, use_bias=False):
    self.in_shape = tuple(in_shape) if isinstance(in_shape, (tuple, list)) else (in_shape,)
    self.out_shape = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (out_shape,)
    self.dtype, param_dtype = dtypes(cfg)
    self.implementation = cfg.matmul
    ops.matmul.get(cfg.matmul)  # fail at build time on an unknown name
    n_in = len(self.in_shape)
    init = nnx.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + len(self.out_shape))))
    self.kernel = param(rngs, init, self.in_shape + self.out_shape, names, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, self.out_shape, names[n_in:], param_dtype)
                 if use_bias else None)

  def __call__(self, x):
    k_in = math.prod(self.in_shape)
    # The seam contracts one axis; multi-axis inputs (heads, head_dim) are flattened.
    x = x.reshape(x.shape[:x.ndim - len(self.in_shape)] + (k_in,)).astype(self.dtype)
    kernel = self.kernel[...].reshape((k_in,) + self.out_shape)
    y = ops.matmul.matmul(x, kernel, implementation=self.implementation)
    if self.bias is not None:
      y += self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """Scale-only norm of the language model; statistics in f32."""

  def __init__(self, dim, cfg, *, rngs, eps=1e-6):
    self.dtype, param_dtype = dtypes(cfg)
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ('embed',), param_dtype)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x *= jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Scale-and-bias norm of the vision encoder; statistics in f32."""

  def __init__(self, dim, cfg, *, rngs, eps=1e-6):
    self.dtype, param_dtype = dtypes(cfg)
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones, (dim,), ('embed',), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros, (dim,), ('embed',), param_dtype)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x -= jnp.mean(x, axis=-1, keepdims=True)
    x *= jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    y = x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def rope_frequencies(dim, base):
  """The inverse frequencies [dim / 2] of rope over vectors of `dim`."""
  half = dim // 2
  return base ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rope(x, positions, base):
  """Rotary embedding of x [B, T, H, D] at integer positions [B, T] (half-split pairs)."""
  angle = positions.astype(jnp.float32)[:, :, None, None] * rope_frequencies(x.shape[-1], base)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class GatedMLP(nnx.Module):
  """The language model's gated-GELU MLP: down(gelu(gate(x)) * up(x))."""

  def __init__(self, width, mlp_dim, cfg, *, rngs):
    self.width = width
    self.gate = Dense(width, mlp_dim, ('embed', 'mlp'), cfg, rngs=rngs)
    self.up = Dense(width, mlp_dim, ('embed', 'mlp'), cfg, rngs=rngs)
    self.down = Dense(mlp_dim, width, ('mlp', 'embed'), cfg, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.gate(x)) * self.up(x))


class MLP(nnx.Module):
  """The vision encoder's GELU MLP with biases."""

  def __init__(self, width, mlp_dim, cfg, *, rngs):
    self.width = width
    self.fc1 = Dense(width, mlp_dim, ('embed', 'mlp'), cfg, rngs=rngs, use_bias=True)
    self.fc2 = Dense(mlp_dim, width, ('mlp', 'embed'), cfg, rngs=rngs, use_bias=True)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))
