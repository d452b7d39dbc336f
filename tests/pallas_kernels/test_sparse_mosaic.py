"""The Mosaic GPU block-sparse forward (with the Mosaic backward behind its
custom_vjp) through the shared suite, in the GPU interpreter on the CPU.

The interpreter simulates the three warpgroups, TMA copies and barriers, so
the pipeline's synchronisation is checked too (it fails on a barrier phase
nobody waited for). It runs the same kernel as the GPU except for the PV
product: jax 0.11.2's interpreter lacks run_state and register-A wgmma, so
there the product is a plain dot (mosaic_gpu._compute_wg says where).
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import BlockSizes, BlockTables, mosaic_gpu
from pallas_kernels.sparse_attention import block_tables as bt
from tests.pallas_kernels.sparse_attention_base import SparseAttentionTestBase


class TestMosaicInterpret(SparseAttentionTestBase):
  kernel = staticmethod(functools.partial(mosaic_gpu.sparse_attention, interpret=True))
  block_sizes = (BlockSizes(128, 64), BlockSizes(128, 128))
  dtypes = ('bfloat16',)
  head_dims = (64,)
  seq_blocks = 1            # one 128-row query tile: the interpreter is slow

  def grad_case(self, case_id):
    return case_id in ('random_ragged_gqa4-bfloat16', 'empty_rows-bfloat16')


def test_tables_from_scores_without_q_tables_still_differentiate():
  """kv tables alone (the gate's inference path) get q tables in the backward."""
  import jax
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, 256, 2, 64), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, 256, 1, 64), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, 256, 1, 64), jnp.bfloat16)
  scores = jax.random.normal(keys[3], (1, 1, 2, 4))
  ids, count = bt.tables_from_scores(scores, jnp.full((1, 1, 2), 2, jnp.int32), 2)
  sizes = BlockSizes(128, 64)
  full = bt.build_block_tables(bt.block_mask_from_tables(ids, count, 4))
  lens = jnp.array([256]), jnp.array([0])
  def loss(tables):
    f = lambda q, k, v: mosaic_gpu.sparse_attention(
        q, k, v, tables, *lens, block_sizes=sizes, interpret=True).astype(jnp.float32).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(loss(BlockTables(ids, count, None, None)), loss(full)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize('what, kwargs, match', [
    ('f32', dict(dtype=jnp.float32), 'bf16/f16'),
    ('block_q', dict(sizes=BlockSizes(64, 64)), 'block_q=128'),
    ('head_dim', dict(d=32), 'head_dim=32'),
])
def test_bad_input_names_the_problem(what, kwargs, match):
  d, dtype = kwargs.get('d', 64), kwargs.get('dtype', jnp.bfloat16)
  q = jnp.zeros((1, 128, 2, d), dtype)
  k = jnp.zeros((1, 128, 1, d), dtype)
  tables = bt.build_block_tables(jnp.ones((1, 1, 1, 2), bool))
  with pytest.raises(ValueError, match=match):
    mosaic_gpu.sparse_attention(q, k, k, tables, jnp.array([128]), jnp.array([0]),
                                block_sizes=kwargs.get('sizes', BlockSizes(128, 64)),
                                interpret=True)
