"""The Mosaic-TPU block-sparse kernel (tpu.py) on CPU; nothing here runs on a TPU.

Two interpreters: interpret=True (Pallas' generic HLO interpreter, fast) runs
the whole shared suite; pltpu.InterpretParams() (JAX's TPU interpreter: tables
in SMEM, VMEM scratch filled with NaN until written, out-of-bounds block reads
raise) is ~3x slower per grid step, so it runs the empty-rows case only. Blocks are 8 rows (the smallest legal TPU block) and D = 128 (one lane
width) so the grids stay small.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from flashmm_jax.ops import attention as attention_ops
from flashmm_jax.ops import sparse_attention as sparse_ops
from pallas_kernels.sparse_attention import tpu
from pallas_kernels.sparse_attention.block_tables import BlockSizes, build_block_tables
from tests.pallas_kernels import sparse_attention_base as base

TPU_INTERPRET = pltpu.InterpretParams()
BS = BlockSizes(8, 8)


class TestTpuHloInterpret(base.SparseAttentionTestBase):
  kernel = staticmethod(functools.partial(tpu.sparse_attention, interpret=True))
  block_sizes = (BS,)         # block_q != block_k: TestTpuMosaicInterpret
  head_dims = (128,)


class TestTpuMosaicInterpret(base.SparseAttentionTestBase):
  """The case where TPU memory semantics matter most: empty rows (rows whose
  scratch no visit writes, padded table slots), GQA 2, block_q != block_k."""
  kernel = staticmethod(functools.partial(tpu.sparse_attention,
                                          interpret=TPU_INTERPRET))
  block_sizes = (BlockSizes(8, 16),)
  head_dims = (128,)
  dtypes = ('float32',)
  skip_cases = tuple(c.name for c in base.CASES if c.name != 'empty_rows')


def _qkv(b, t, s, hq, hkv, d=128, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (b, t, hq, d)), jax.random.normal(kk, (b, s, hkv, d)),
          jax.random.normal(kv, (b, s, hkv, d)))


def test_unlisted_blocks_are_never_read():
  """NaN in every key block no query block lists: the output and dq stay
  finite and equal the clean reference, dk/dv of those blocks are 0. Narrow
  kv tables (max_k < nK) check that the grid follows the table width; without
  q tables (as tables_from_scores gives) the backward builds its own."""
  b, t, hq, hkv = 1, 32, 2, 1
  q, k, v = _qkv(b, t, t, hq, hkv, seed=1)
  mask = jnp.zeros((b, hkv, 4, 4), bool).at[..., 0].set(True).at[..., 3, 2].set(True)
  tables = build_block_tables(mask, max_k=2)._replace(q_ids=None, q_count=None)
  unlisted = jnp.repeat(~mask.any(axis=2), BS.block_k, axis=-1)[:, :, :, None]
  unlisted = jnp.swapaxes(unlisted, 1, 2)                     # [B, S, Hkv, 1]
  dirty = lambda x: jnp.where(unlisted, jnp.nan, x)
  lens = jnp.array([t], jnp.int32), jnp.array([4], jnp.int32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) ** 2)
  got_fn = lambda q, k, v: tpu.sparse_attention(
      q, k, v, tables, *lens, block_sizes=BS, interpret=True)
  want_fn = lambda q, k, v: base.reference_sparse_attention(
      q, k, v, mask, *lens, block_sizes=BS)
  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)),
                           static_argnums=0)
  out, grads = loss_and_grads(got_fn, q, dirty(k), dirty(v))
  want, want_grads = loss_and_grads(want_fn, q, k, v)
  np.testing.assert_allclose(out, want, rtol=1e-5)
  for name, g, w in zip('qkv', grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=f'd{name}')
  for g in grads[1:]:                                         # dk, dv
    assert not np.any(np.asarray(g)[np.broadcast_to(unlisted, k.shape)])


def test_seam_runs_tpu_kernel():
  """sparse_attend(implementation='tpu') == 'reference', non-causal mask
  (prefix_for turns it into a prefix over all keys), ragged kv_len."""
  q, k, v = _qkv(2, 16, 16, 4, 2, seed=2)
  mask = attention_ops.MaskSpec(q_offset=jnp.zeros(2, jnp.int32),
                                kv_len=jnp.array([16, 9], jnp.int32),
                                prefix_len=jnp.zeros(2, jnp.int32), causal=False)
  tables = build_block_tables(jnp.ones((2, 2, 2, 2), bool).at[1, 0, 1, 0].set(False))
  run = jax.jit(lambda impl: sparse_ops.sparse_attend(
      q, k, v, mask, tables, block_sizes=BS, implementation=impl), static_argnums=0)
  np.testing.assert_allclose(run('tpu'), run('reference'), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('bs, t, s, match', [
    (BlockSizes(12, 8), 24, 24, 'block_q=12 must be a multiple of 8'),
    (BlockSizes(8, 4), 16, 16, 'block_k=4 must be a multiple of 8'),
    (BlockSizes(16, 8), 24, 24, 'seq_len=24 must be a multiple of block_q=16'),
])
def test_rejects_illegal_blocks(bs, t, s, match):
  q, k, v = _qkv(1, t, s, 1, 1, d=8)
  tables = build_block_tables(jnp.ones((1, 1, max(t // bs.block_q, 1),
                                        max(s // bs.block_k, 1)), bool))
  lens = jnp.array([s], jnp.int32)
  with pytest.raises(ValueError, match=match):
    tpu.sparse_attention(q, k, v, tables, lens, lens, block_sizes=bs, interpret=True)


def test_rejects_tables_of_other_shape():
  q, k, v = _qkv(1, 16, 16, 2, 2, d=8)
  tables = build_block_tables(jnp.ones((1, 1, 2, 2), bool))     # Hkv 1, not 2
  lens = jnp.array([16], jnp.int32)
  with pytest.raises(ValueError, match=r'must start with \(B, Hkv, nQ\)=\(1, 2, 2\)'):
    tpu.sparse_attention(q, k, v, tables, lens, lens, block_sizes=BS, interpret=True)
