"""The matmul seam: every Dense layer's contraction goes through `matmul`.

Quantised kernels (int4, fp8) register here later; layers only name one.
"""

import jax.numpy as jnp
from jax import lax

from flashmm_jax.ops import registry

_REGISTRY = registry.Registry('matmul')
register = _REGISTRY.register
get = _REGISTRY.get


def matmul(x, kernel, *, implementation):
  """Contracts x's last axis with kernel's first: [..., K] x [K, ...] -> [..., ...]."""
  if x.shape[-1] != kernel.shape[0]:
    raise ValueError(f'matmul: x of shape {x.shape} does not contract with '
                     f'kernel of shape {kernel.shape} (last axis vs first axis)')
  return get(implementation)(x, kernel)


@register('xla')
def _xla(x, kernel):
  # Inputs in the compute dtype (x's), accumulation in f32 so bf16 sums of
  # thousands of products keep their precision; the result returns to x's dtype.
  out = lax.dot_general(x, kernel.astype(x.dtype),
                        (((x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
  return out.astype(x.dtype)
