"""select_triton's kernels in the Triton interpreter: the pooling and the
scored tables against the XLA path they replace (benchmarks/attention.py's
selection stage). Inputs are small integers, so every sum is exact and the
tables must agree exactly, not just up to near-ties. The table builder alone
is checked with the other tables_from_scores methods (test_sparse_attention.py)
and every kernel's GPU lowering in test_lowering.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import attention as bench
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import select_triton


def _int_inputs(seed, b, t, hq, hkv, d):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  q = jax.random.randint(keys[0], (b, t, hq, d), -3, 4).astype(jnp.bfloat16)
  k = jax.random.randint(keys[1], (b, t, hkv, d), -3, 4).astype(jnp.bfloat16)
  return q, k


@pytest.mark.parametrize('seq, block_k, prefix', [(384, 64, 0), (256, 128, 100)])
def test_fused_selection_equals_the_xla_stage(seq, block_k, prefix):
  """benchmarks/attention.py's `fused` selection (both kernels) gives the
  `top_k` path's tables: causal, a ragged key-block count (6, padded to 8),
  and a bidirectional prefix."""
  q, k = _int_inputs(seq, 1, seq, 8, 2, 64)
  visible = bench.visible_tiles(seq, block_k, prefix)
  for keep in (0.35, 1.0):
    want = bench.select_blocks(q, k, keep, visible, block_k, 'top_k')
    got = bench.select_blocks(q, k, keep, visible, block_k, 'fused')
    np.testing.assert_array_equal(got.kv_count, want.kv_count)
    np.testing.assert_array_equal(got.kv_ids, want.kv_ids)


def test_pool_blocks_is_mean_and_max():
  q, k = _int_inputs(1, 2, 256, 4, 1, 32)
  qp, kp = select_triton.pool_blocks(q, k, block_q=128, block_k=32, interpret=True)
  mean = q.astype(jnp.float32).reshape(2, 2, 128, 1, 4, 32).mean(axis=(2, 4))
  np.testing.assert_array_equal(qp, mean.astype(jnp.bfloat16))
  np.testing.assert_array_equal(kp, k.reshape(2, 8, 32, 1, 32).max(axis=2))


def test_a_scalar_budget_broadcasts_over_rows():
  scores = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 20))
  got = select_triton.tables_from_scores(scores, 5, 7, interpret=True)
  want = bt.tables_from_scores(scores, jnp.full((3, 2), 5, jnp.int32), 7)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize('call, match', [
    (lambda: select_triton.pool_blocks(jnp.zeros((1, 200, 4, 32)), jnp.zeros((1, 200, 1, 32)),
                                       block_q=128, block_k=64), 'whole blocks'),
    (lambda: select_triton.pool_blocks(jnp.zeros((1, 128, 3, 32)), jnp.zeros((1, 128, 1, 32)),
                                       block_q=128, block_k=64), 'group=3'),
    (lambda: select_triton.score_tables(jnp.zeros((1, 2, 1, 32)), jnp.zeros((1, 4, 1, 32)),
                                        jnp.zeros((2, 3), jnp.int8), jnp.zeros((2,), jnp.int32),
                                        2), 'rule'),
])
def test_bad_shapes_name_the_problem(call, match):
  with pytest.raises(ValueError, match=match):
    call()
