"""The Pallas-Triton block-sparse kernels (forward, dq, dk/dv) in interpret
mode on CPU, through the shared suite; plus the wrapper's own checks.

Interpret mode costs ~0.4 ms per grid step, so shapes stay at 2 blocks.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from flashmm_jax.ops import attention as attention_ops
from flashmm_jax.ops import sparse_attention as sparse_ops
from pallas_kernels.sparse_attention import BlockSizes, build_block_tables, triton
from pallas_kernels.sparse_attention.reference import element_mask, expand_block_mask
from tests.pallas_kernels.sparse_attention_base import (
    CASES, SparseAttentionTestBase, make_inputs)


class TestTritonInterpret(SparseAttentionTestBase):
  kernel = staticmethod(functools.partial(triton.sparse_attention, interpret=True))
  block_sizes = (BlockSizes(32, 32), BlockSizes(16, 32))

  def grad_case(self, case_id):
    # bf16 changes only the dot operand casts: one GQA case covers them; and
    # one case with block_q != block_k is enough for the backward.
    if 'bfloat16' in case_id:
      return case_id == 'random_ragged_gqa4-bfloat16'
    return case_id != 'all_blocks_mha-float32-bq16bk32'


def test_lse_and_its_gradient():
  """The lse residual matches the dense logsumexp, and a loss on it
  differentiates like the reference's (the backward folds d_lse into delta)."""
  x = make_inputs(CASES[2], jnp.float32, 32, BlockSizes(32, 32), seq_blocks=2)
  def kernel_lse(q, k, v):
    return triton.sparse_attention(q, k, v, x.tables, x.kv_len, x.prefix_len,
                                   block_sizes=x.block_sizes, interpret=True,
                                   return_lse=True)[1]
  def reference_lse(q, k, v):  # log of the softmax denominator, over visible keys
    logits, seen = _dense_logits(x, q, k)
    return jax.nn.logsumexp(jnp.where(seen, logits, -jnp.inf), axis=-1)
  lse, want = kernel_lse(x.q, x.k, x.v), reference_lse(x.q, x.k, x.v)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want)[finite],
                             atol=1e-5, rtol=1e-5)
  w = jnp.where(finite, jax.random.normal(jax.random.PRNGKey(0), lse.shape), 0.0)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.where(finite, f(q, k, v), 0.0) * w)
  grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))
  got = grad(kernel_lse)(x.q, x.k, x.v)
  exp = grad(reference_lse)(x.q, x.k, x.v)
  for name, g, r in zip('qkv', got, exp):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4, err_msg=f'd{name}')


def _dense_logits(x, q, k):
  """[B, Hq, T, S] scaled logits and visibility, from the reference's pieces."""
  hq, hkv = q.shape[2], k.shape[2]
  k = jnp.repeat(k, hq // hkv, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k) * q.shape[-1] ** -0.5
  seen = (expand_block_mask(x.block_mask, hq, x.block_sizes)
          & element_mask(q.shape[1], k.shape[1], x.kv_len, x.prefix_len)[:, None])
  return logits, seen


def test_rejects_bad_shapes():
  x = make_inputs(CASES[0], jnp.float32, 32, BlockSizes(32, 32), seq_blocks=2)
  call = functools.partial(triton.sparse_attention, interpret=True)
  with pytest.raises(ValueError, match='must be a multiple of block_q=48'):
    call(x.q, x.k, x.v, x.tables, x.kv_len, x.prefix_len,
         block_sizes=BlockSizes(48, 32))
  with pytest.raises(ValueError, match='block_k=24 must be a power of two'):
    call(x.q[:, :48], x.k[:, :48], x.v[:, :48], x.tables, x.kv_len, x.prefix_len,
         block_sizes=BlockSizes(16, 24))
  with pytest.raises(ValueError, match='query heads must be a multiple'):
    q3 = jnp.concatenate([x.q, x.q[:, :, :1]], axis=2)       # 3 query heads, 2 kv
    call(q3, x.k, x.v, x.tables, x.kv_len, x.prefix_len, block_sizes=x.block_sizes)
  with pytest.raises(ValueError, match=r'tables kv_ids .* must start with'):
    other = build_block_tables(jnp.ones((2, 2, 4, 2), bool))
    call(x.q, x.k, x.v, other, x.kv_len, x.prefix_len, block_sizes=x.block_sizes)


@pytest.mark.parametrize('causal', [True, False], ids=['causal_prefix', 'bidirectional'])
def test_seam_triton_matches_reference(causal):
  """sparse_attend(implementation='triton') runs the kernel in interpret mode
  on this CPU host and agrees with 'reference', values and gradients."""
  x = make_inputs(CASES[2], jnp.float32, 32, BlockSizes(32, 32), seq_blocks=2)
  mask = attention_ops.MaskSpec(q_offset=jnp.zeros(2, jnp.int32), kv_len=x.kv_len,
                                prefix_len=x.prefix_len, causal=causal)
  def loss(impl):
    return lambda q: jnp.sum(jnp.sin(sparse_ops.sparse_attend(
        q, x.k, x.v, mask, x.tables, block_sizes=x.block_sizes,
        implementation=impl)))
  for fn in (loss, lambda impl: jax.grad(loss(impl))):
    fn = lambda impl, fn=fn: jax.jit(fn(impl))   # one compile, not op by op
    np.testing.assert_allclose(fn('triton')(x.q), fn('reference')(x.q),
                               atol=1e-5, rtol=1e-5)
