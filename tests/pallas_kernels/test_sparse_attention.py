"""Block-sparse attention: tables round-trip, reference vs an independent dense
formula, and the Pallas kernel (interpret=True, CPU) vs the reference.

Shapes are tiny on purpose: interpret mode costs ~0.4 ms per grid step.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import (
    BlockSizes, block_mask_from_tables, build_block_tables,
    reference_sparse_attention, sparse_attention)

BS = BlockSizes(block_q=32, block_k=32)
B, T, D = 2, 64, 32
N_BLOCKS = T // 32


def _random_mask(seed, shape, p=0.5):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), p, shape)


def _inputs(seed, hq, hkv, dtype):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (B, T, hq, D), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, T, hkv, D), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, T, hkv, D), jnp.float32).astype(dtype)
  return q, k, v


def _dense_prefix_lm(q, k, v, kv_len, prefix_len):
  """Independent dense causal prefix-LM attention (no block logic at all)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for i in range(q.shape[1]):
        js = [j for j in range(k.shape[1])
              if j < kv_len[b] and (j < prefix_len[b] or j <= i)]
        if not js:
          continue
        s = k[b, js, h // group] @ q[b, i, h] / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max())
        out[b, i, h] = p @ v[b, js, h // group] / p.sum()
  return out


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

def test_reference_all_blocks_is_dense_prefix_lm():
  q, k, v = _inputs(1, 4, 2, jnp.float32)
  kv_len, prefix_len = [64, 41], [0, 20]
  mask = jnp.ones((B, 2, N_BLOCKS, N_BLOCKS), bool)
  out = reference_sparse_attention(q, k, v, mask, jnp.array(kv_len),
                                   jnp.array(prefix_len), block_sizes=BS)
  np.testing.assert_allclose(out, _dense_prefix_lm(q, k, v, kv_len, prefix_len),
                             atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- kernel ----

def _block_mask(kind, hkv, seed):
  shape = (B, hkv, N_BLOCKS, N_BLOCKS)
  if kind == "all":
    return jnp.ones(shape, bool)
  if kind == "diagonal":
    return jnp.broadcast_to(jnp.eye(N_BLOCKS, dtype=bool), shape)
  if kind == "random":
    return _random_mask(seed, shape)
  if kind == "empty_row":  # batch 1, query block 1 selects nothing
    return jnp.ones(shape, bool).at[1, 0, 1].set(False)
  raise ValueError(kind)


CASES = [  # (mask kind, Hq, Hkv, dtype, kv_len, prefix_len)
    ("all", 1, 1, jnp.float32, [64, 64], [0, 0]),
    ("all", 4, 1, jnp.float32, [64, 41], [0, 20]),
    ("diagonal", 2, 2, jnp.float32, [64, 50], [10, 0]),
    ("random", 4, 1, jnp.float32, [64, 37], [33, 5]),
    ("empty_row", 4, 1, jnp.float32, [0, 45], [0, 40]),   # batch 0: no keys
    ("random", 2, 2, jnp.bfloat16, [64, 37], [0, 12]),
    ("all", 4, 1, jnp.bfloat16, [64, 41], [0, 20]),
]


@pytest.mark.parametrize("kind,hq,hkv,dtype,kv_len,prefix_len", CASES)
def test_kernel_matches_reference(kind, hq, hkv, dtype, kv_len, prefix_len):
  q, k, v = _inputs(hq * 10 + hkv, hq, hkv, dtype)
  mask = _block_mask(kind, hkv, seed=hq)
  kv_len, prefix_len = jnp.array(kv_len), jnp.array(prefix_len)
  t = build_block_tables(mask)
  out = sparse_attention(q, k, v, t.kv_ids, t.kv_count, kv_len, prefix_len,
                         block_sizes=BS, interpret=True)
  ref = reference_sparse_attention(q, k, v, mask, kv_len, prefix_len,
                                   block_sizes=BS)
  assert out.dtype == dtype and out.shape == q.shape
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(ref, np.float32), atol=tol, rtol=tol)
  if kind == "empty_row":  # rows with no visible key are exactly 0
    assert not np.any(np.asarray(out[0]))
    assert not np.any(np.asarray(out[1, 32:]))


def test_kernel_rejects_bad_shapes():
  q, k, v = _inputs(0, 1, 1, jnp.float32)
  t = build_block_tables(jnp.ones((B, 1, N_BLOCKS, N_BLOCKS), bool))
  lens = jnp.array([T, T])
  with pytest.raises(ValueError, match="must be a multiple of block_q=48"):
    sparse_attention(q, k, v, t.kv_ids, t.kv_count, lens, lens,
                     block_sizes=BlockSizes(block_q=48, block_k=32), interpret=True)
  with pytest.raises(ValueError, match="query heads must be a multiple"):
    q3 = jnp.concatenate([q, q, q], axis=2)               # 3 query heads
    k2, v2 = (jnp.concatenate([x, x], axis=2) for x in (k, v))  # 2 kv heads
    sparse_attention(q3, k2, v2, t.kv_ids, t.kv_count, lens, lens,
                     block_sizes=BS, interpret=True)
