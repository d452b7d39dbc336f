import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashmm_jax.ops import attention
from flashmm_jax.ops.attention import MaskSpec


def _spec(q_offset, kv_len, prefix_len, causal=True):
  i32 = lambda v: jnp.array(v, jnp.int32)
  return MaskSpec(q_offset=i32(q_offset), kv_len=i32(kv_len), prefix_len=i32(prefix_len),
                  causal=causal)


def test_dense_prefix_lm_with_padding_and_ragged_prefix():
  mask = _spec(q_offset=[0, 0], kv_len=[5, 4], prefix_len=[2, 3]).dense(5, 5)
  expected = np.array([
      # row 0: prefix {0, 1}, then causal; no padding.
      [[1, 1, 0, 0, 0],
       [1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0],
       [1, 1, 1, 1, 1]],
      # row 1: prefix {0, 1, 2}, key 4 is padding.
      [[1, 1, 1, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0],
       [1, 1, 1, 1, 0]],
  ], bool)
  np.testing.assert_array_equal(mask, expected)


def test_dense_decode_step_uses_q_offset():
  mask = _spec(q_offset=[3, 1], kv_len=[5, 3], prefix_len=[1, 0]).dense(2, 6)
  expected = np.array([
      [[1, 1, 1, 1, 0, 0],   # query at position 3
       [1, 1, 1, 1, 1, 0]],  # query at position 4
      [[1, 1, 0, 0, 0, 0],   # query at position 1
       [1, 1, 1, 0, 0, 0]],  # query at position 2; key 3+ padding
  ], bool)
  np.testing.assert_array_equal(mask, expected)


def test_dense_non_causal_masks_only_padding():
  mask = _spec(q_offset=[0], kv_len=[3], prefix_len=[0], causal=False).dense(2, 4)
  np.testing.assert_array_equal(mask, [[[1, 1, 1, 0], [1, 1, 1, 0]]])


@jax.jit
def _naive(q, k, v, visible):
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(visible[:, None], logits, -jnp.inf)
  probs = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))  # all -inf rows -> 0
  return jnp.einsum('bhts,bshd->bthd', probs, v)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_xla_matches_naive_gqa_with_fully_masked_rows(groups):
  b, t, s, hkv, d = 3, 4, 6, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(groups), 3)
  q = jax.random.normal(kq, (b, t, hkv * groups, d))
  k = jax.random.normal(kk, (b, s, hkv, d))
  v = jax.random.normal(kv, (b, s, hkv, d))
  # Row 2 has no valid key at all: its output must be zeros, not NaN.
  mask = _spec(q_offset=[0, 2, 0], kv_len=[6, 5, 0], prefix_len=[2, 0, 0])
  with jax.default_matmul_precision('highest'):  # no TF32 on GPU: compare the math
    out = jax.jit(attention.attend, static_argnames='implementation')(
        q, k, v, mask, implementation='xla')
    want = _naive(q, k, v, mask.dense(t, s))
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out[2], 0.0)


def test_auto_on_cpu_equals_xla():
  if jax.default_backend() == 'gpu':
    pytest.skip('auto picks cudnn on GPU')
  q = jax.random.normal(jax.random.key(0), (1, 3, 4, 8))
  k = v = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
  mask = _spec([0], [3], [1])
  attend = jax.jit(attention.attend, static_argnames='implementation')
  np.testing.assert_array_equal(attend(q, k, v, mask, implementation='auto'),
                                attend(q, k, v, mask, implementation='xla'))


def test_cudnn_off_gpu_raises():
  if jax.default_backend() == 'gpu':
    pytest.skip('runs on GPU')
  q = k = v = jnp.zeros((1, 2, 2, 8), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match='needs a GPU'):
    attention.attend(q, k, v, _spec([0], [2], [0]), implementation='cudnn')


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a GPU')
@pytest.mark.parametrize('causal', [False, True])
def test_cudnn_matches_xla_on_gpu(causal):
  b, t, hkv, d = 2, 128, 2, 64
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, 4 * hkv, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
  mask = _spec([0, 0], [128, 100], [40, 7], causal=causal)
  got = attention.attend(q, k, v, mask, implementation='cudnn').astype(jnp.float32)
  want = attention.attend(q, k, v, mask, implementation='xla').astype(jnp.float32)
  valid = mask.dense(t, t).any(-1)[..., None, None]  # cuDNN may differ on padded queries
  np.testing.assert_allclose(jnp.where(valid, got, 0), jnp.where(valid, want, 0), atol=2e-2)


def test_bad_gqa_ratio_is_an_error():
  q = jnp.zeros((1, 2, 3, 8))
  k = v = jnp.zeros((1, 2, 2, 8))
  with pytest.raises(ValueError, match='3 query heads are not a multiple of 2'):
    attention.attend(q, k, v, _spec([0], [2], [0]), implementation='xla')


def test_unknown_implementation_lists_valid_names():
  q = k = v = jnp.zeros((1, 2, 2, 8))
  with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash3'.*'xla'"):
    attention.attend(q, k, v, _spec([0], [2], [0]), implementation='flash3')


def test_tokamax_absent_is_a_clear_not_implemented():
  """Without the package 'tokamax' says so, and 'auto' falls back past it."""
  try:
    import tokamax  # noqa: F401
    pytest.skip('tokamax is installed here')
  except ImportError:
    pass
  q = jnp.ones((1, 2, 2, 8), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match='tokamax'):
    attention.attend(q, q, q, _spec([0], [2], [0]), implementation='tokamax')
