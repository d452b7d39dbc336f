"""benchmarks/attention.py --cotangents: the two ways fwd+bwd gets its output
cotangent give the gradients they name."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import attention


def test_grad_fn_protocols():
  q, k, v, d_out = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5))
  fn = lambda q, k, v: (q * k + v, None)     # a tuple, as the kernels' (out, lse)
  random = attention.grad_fn(fn, 'random')(q, k, v, d_out)
  for got, want in zip(random, (d_out * k, d_out * q, d_out)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  constant = attention.grad_fn(fn, 'constant')(q, k, v, d_out)   # d_out unused
  for got, want in zip(constant, (1e-3 * k, 1e-3 * q, jnp.full_like(v, 1e-3))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
