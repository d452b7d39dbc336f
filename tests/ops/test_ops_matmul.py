import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashmm_jax.ops import matmul


@pytest.mark.parametrize('kernel_shape,spec', [((8, 5), 'btk,kn->btn'),
                                               ((8, 3, 4), 'btk,khd->bthd')])
def test_xla_contracts_last_axis_with_first(kernel_shape, spec):
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  out = matmul.matmul(x, kernel, implementation='xla')
  np.testing.assert_allclose(out, jnp.einsum(spec, x, kernel), rtol=1e-5, atol=1e-5)


def test_xla_computes_in_x_dtype():
  x = jnp.ones((2, 8), jnp.bfloat16)
  out = matmul.matmul(x, jnp.ones((8, 4), jnp.float32), implementation='xla')
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, 8.0)


def test_shape_mismatch_and_unknown_name_are_errors():
  with pytest.raises(ValueError, match='does not contract'):
    matmul.matmul(jnp.ones((2, 8)), jnp.ones((4, 8)), implementation='xla')
  with pytest.raises(ValueError, match=r"Unknown matmul implementation 'int3'.*'xla'"):
    matmul.matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), implementation='int3')
