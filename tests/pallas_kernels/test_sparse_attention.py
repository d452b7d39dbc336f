"""Block-sparse attention: tables round-trip, and the reference itself run
through the shared suite (sparse_attention_base.py) so the suite's cases are
checked against the independent dense formula. Kernels have their own files
(test_sparse_triton.py, ...).
"""

import numpy as np

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import (
    BlockSizes, block_mask_from_tables, build_block_tables,
    reference_sparse_attention)
from tests.pallas_kernels.sparse_attention_base import SparseAttentionTestBase

def _random_mask(seed, shape, p=0.5):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), p, shape)


# ---------------------------------------------------------------- tables ----

def test_tables_round_trip_and_order():
  mask = _random_mask(0, (2, 3, 5, 7)).at[0, 0, 0].set(False)  # an empty row
  t = jax.jit(build_block_tables)(mask)
  assert t.kv_ids.dtype == t.kv_count.dtype == jnp.int32
  assert t.kv_ids.shape == (2, 3, 5, 7) and t.q_ids.shape == (2, 3, 7, 5)
  np.testing.assert_array_equal(block_mask_from_tables(t.kv_ids, t.kv_count, 7), mask)
  np.testing.assert_array_equal(
      block_mask_from_tables(t.q_ids, t.q_count, 5), jnp.swapaxes(mask, -1, -2))
  ids, count = np.asarray(t.kv_ids), np.asarray(t.kv_count)
  for row, n in zip(ids.reshape(-1, 7), count.reshape(-1)):
    assert np.all(np.diff(row[:n]) > 0)                      # ascending
    assert np.all(row[n:] == (row[n - 1] if n else 0))       # padding
  assert count[0, 0, 0] == 0 and np.all(ids[0, 0, 0] == 0)


def test_tables_static_width():
  mask = jnp.zeros((1, 1, 4, 8), bool).at[0, 0, :, 2].set(True).at[0, 0, 1, 6].set(True)
  t = build_block_tables(mask, max_k=2)
  np.testing.assert_array_equal(t.kv_ids[0, 0], [[2, 2], [2, 6], [2, 2], [2, 2]])
  np.testing.assert_array_equal(t.kv_count[0, 0], [1, 2, 1, 1])


# ------------------------------------------------------------- reference ----

def _reference_kernel(q, k, v, tables, kv_len, prefix_len, *, block_sizes):
  """The reference behind the base's kernel contract (mask rebuilt from tables)."""
  n_k = k.shape[1] // block_sizes.block_k
  mask = block_mask_from_tables(tables.kv_ids, tables.kv_count, n_k)
  return reference_sparse_attention(q, k, v, mask, kv_len, prefix_len,
                                    block_sizes=block_sizes)


class TestReferenceThroughBase(SparseAttentionTestBase):
  """Checks the shared cases themselves: tables -> mask round trip, the dense
  formula on all-blocks cases, keyless rows exactly 0. Cheap (plain jnp)."""
  kernel = staticmethod(_reference_kernel)
  block_sizes = (BlockSizes(32, 32), BlockSizes(16, 32))
  head_dims = (32, 16)
  supports_grad = False
