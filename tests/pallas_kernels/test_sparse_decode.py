"""Block-sparse decode (decode.py): the Triton kernel in interpret mode vs the
jnp decode reference, the reference vs dense attention, and the seam.

Grids are (B, Hkv, splits): a handful of steps, so interpret mode is cheap.
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from flashmm_jax.ops import attention as attention_ops
from flashmm_jax.ops import sparse_attention as sparse_ops
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import decode

BLOCK_K = 16
S = 64                       # cache slots: 4 blocks
N_BLOCKS = S // BLOCK_K


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  name: str
  new: int                   # M new tokens
  heads: tuple[int, int]     # (Hq, Hkv)
  kv_len: tuple[int, int]    # filled cache length per row, new tokens included
  prefix: tuple[int, int] = (0, 0)
  splits: int = 2
  dtype: str = 'float32'
  empty_row: bool = False    # (batch 1, kv head 0) selects no block


CASES = [
    DecodeCase('one_token_mha', 1, (2, 2), (64, 37)),
    DecodeCase('one_token_gqa8', 1, (8, 1), (50, 9), splits=3),
    DecodeCase('four_tokens_gqa4_prefix', 4, (8, 2), (40, 64), prefix=(38, 10)),
    DecodeCase('eight_tokens_gqa4_bf16', 8, (4, 1), (64, 29), dtype='bfloat16'),
    DecodeCase('empty_selection_row', 2, (4, 2), (33, 60), splits=4, empty_row=True),
    DecodeCase('more_splits_than_blocks', 3, (2, 1), (64, 21), splits=8),
]


def _inputs(case, seed=0):
  hq, hkv = case.heads
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32),
                                      case.dtype)
  q = normal(2, case.new, hq, 32)
  k, v = normal(2, S, hkv, 32), normal(2, S, hkv, 32)
  # Random blocks, always the one holding the newest token (like a gate would).
  kv_len = np.array(case.kv_len)
  mask = rng.random((2, hkv, N_BLOCKS)) < 0.5
  mask[np.arange(2), :, (np.maximum(kv_len, 1) - 1) // BLOCK_K] = True
  if case.empty_row:
    mask[1, 0] = False
  kv_ids, kv_count = bt.compact_rows(jnp.asarray(mask), N_BLOCKS)
  lens = dict(kv_len=jnp.asarray(kv_len, jnp.int32),
              prefix_len=jnp.asarray(case.prefix, jnp.int32),
              q_offset=jnp.asarray(kv_len - case.new, jnp.int32))
  return q, k, v, kv_ids, kv_count, lens


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_kernel_matches_reference(case):
  q, k, v, kv_ids, kv_count, lens = _inputs(case)
  out = decode.sparse_decode(q, k, v, kv_ids, kv_count, **lens, block_k=BLOCK_K,
                             num_splits=case.splits, interpret=True)
  want = decode.sparse_decode_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      kv_ids, kv_count, **lens, block_k=BLOCK_K)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if case.dtype == 'float32' else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
  if case.empty_row:  # batch 1, kv head 0's query heads saw nothing: exactly 0
    group = q.shape[2] // k.shape[2]
    assert not np.any(np.asarray(out[1, :, :group]))


def test_reference_all_blocks_is_dense_attention():
  """All blocks selected == the dense 'xla' attention under the same MaskSpec."""
  case = CASES[2]
  q, k, v, _, _, lens = _inputs(case, seed=1)
  ids = jnp.broadcast_to(jnp.arange(N_BLOCKS, dtype=jnp.int32), (2, 2, N_BLOCKS))
  count = jnp.full((2, 2), N_BLOCKS, jnp.int32)
  mask = attention_ops.MaskSpec(causal=True, **lens)
  got = decode.sparse_decode_reference(q, k, v, ids, count, **lens, block_k=BLOCK_K)
  want = attention_ops.attend(q, k, v, mask, implementation='xla')
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splits_do_not_change_the_result():
  q, k, v, kv_ids, kv_count, lens = _inputs(CASES[1], seed=2)
  outs = [decode.sparse_decode(q, k, v, kv_ids, kv_count, **lens, block_k=BLOCK_K,
                               num_splits=n, interpret=True) for n in (1, 4)]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_combine_weights_partials_by_lse():
  """Two halves of one softmax, merged, equal the whole; an empty split is ignored."""
  logits = jnp.array([[0.3, -1.0, 2.0, 0.5]])
  vals = jnp.array([[1.0], [2.0], [3.0], [4.0]])
  half = lambda sl: (jax.nn.softmax(logits[:, sl]) @ vals[sl],
                     jax.nn.logsumexp(logits[:, sl], axis=-1))
  (o1, l1), (o2, l2) = half(slice(0, 1)), half(slice(1, 4))
  out = jnp.stack([o1, o2, jnp.zeros_like(o1)])
  lse = jnp.stack([l1, l2, jnp.full_like(l1, -jnp.inf)])
  np.testing.assert_allclose(decode.combine(out, lse, axis=0),
                             jax.nn.softmax(logits) @ vals, rtol=1e-6)
  assert not np.any(decode.combine(jnp.zeros((2, 1, 1)), jnp.full((2, 1), -jnp.inf), 0))


def test_seam_triton_matches_reference():
  q, k, v, kv_ids, kv_count, lens = _inputs(CASES[2], seed=3)
  mask = attention_ops.MaskSpec(causal=True, **lens)
  run = lambda impl: sparse_ops.sparse_decode(q, k, v, mask, kv_ids, kv_count,
                                              block_k=BLOCK_K, implementation=impl)
  np.testing.assert_allclose(run('triton'), run('reference'), atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes():
  q, k, v, kv_ids, kv_count, lens = _inputs(CASES[0])
  with pytest.raises(ValueError, match='must be a multiple of block_k=16'):
    decode.sparse_decode(q, k[:, :40], v[:, :40], kv_ids, kv_count, **lens,
                         block_k=BLOCK_K, interpret=True)
  with pytest.raises(ValueError, match=r'must be \(B, Hkv, max_k\)'):
    decode.sparse_decode(q, k, v, kv_ids[:1], kv_count, **lens, block_k=BLOCK_K,
                         interpret=True)
