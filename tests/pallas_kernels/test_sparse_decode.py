"""Block-sparse decode (decode.py): the Triton kernels (block tables; scores and
a cutoff) in interpret mode vs their jnp references, the references vs dense
attention, the seams, and the benchmark's fused decode step.

Grids are (B, Hkv, splits): a handful of steps, so interpret mode is cheap.
Each kernel test runs with blocks_per_step 1, 2 and 4 on a cache whose unread
blocks are NaN: a step's surplus slots (count % blocks_per_step tails, the
prefetched group after the last) may only re-read blocks the row selected.
"""

import dataclasses

from absl import flags
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from benchmarks import attention as bench
from flashmm_jax.ops import attention as attention_ops
from flashmm_jax.ops import sparse_attention as sparse_ops
from pallas_kernels.sparse_attention import block_cutoff as bc
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


def _loop_params(cases):
  """(case, blocks_per_step, prefetch): every case with 1, 2 and 4 blocks a
  step, the prefetch depth rotating over the cases so every pair runs."""
  return [pytest.param(c, n, (i + j) % 3, id=f'{c.name}-n{n}-p{(i + j) % 3}')
          for i, c in enumerate(cases) for j, n in enumerate((1, 2, 4))]


def _poison(x, blocks):
  """x [B, S, Hkv, D] with NaN in the key blocks not in blocks [B, Hkv, nK]."""
  keep = jnp.repeat(blocks, x.shape[1] // blocks.shape[-1], axis=-1)
  return jnp.where(keep.transpose(0, 2, 1)[..., None], x, jnp.nan).astype(x.dtype)


def _random_qkv(case, rng, length):
  """q [2, M, Hq, 32] and a K/V cache [2, length, Hkv, 32] in the case's dtype."""
  hq, hkv = case.heads
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32),
                                      case.dtype)
  return normal(2, case.new, hq, 32), normal(2, length, hkv, 32), normal(2, length, hkv, 32)


def _inputs(case, seed=0):
  hkv = case.heads[1]
  rng = np.random.default_rng(seed)
  q, k, v = _random_qkv(case, rng, S)
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


@pytest.mark.parametrize('case, blocks_per_step, prefetch', _loop_params(CASES))
def test_kernel_matches_reference(case, blocks_per_step, prefetch):
  q, k, v, kv_ids, kv_count, lens = _inputs(case)
  read = bt.block_mask_from_tables(kv_ids, kv_count, N_BLOCKS)
  # Garbage past the count: the kernel must not use it, even as an address.
  junk = jnp.where(jnp.arange(kv_ids.shape[-1]) < kv_count[..., None], kv_ids, 999)
  out = decode.sparse_decode(q, _poison(k, read), _poison(v, read), junk, kv_count,
                             **lens, block_k=BLOCK_K, num_splits=case.splits,
                             blocks_per_step=blocks_per_step, prefetch=prefetch,
                             interpret=True)
  want = decode.sparse_decode_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      kv_ids, kv_count, **lens, block_k=BLOCK_K)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if case.dtype == 'float32' else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)
  if case.empty_row:  # batch 1, kv head 0's query heads saw nothing: exactly 0
    group = q.shape[2] // k.shape[2]
    assert not np.any(np.asarray(out[1, :, :group]))


@pytest.mark.parametrize('blocks_per_step, prefetch', [(2, 0), (4, 1), (4, 2)])
def test_step_tails(blocks_per_step, prefetch):
  """One split, rows of 0, 1, 4, 5, 7 and 8 of 8 blocks: every tail length of
  4-block steps, an exact multiple, an empty row, a single block."""
  case = DecodeCase('tails', 2, (6, 3), (128, 100), splits=1)
  rng = np.random.default_rng(7)
  q, k, v = _random_qkv(case, rng, 128)
  count = np.array([[0, 1, 4], [5, 7, 8]])
  ids = np.stack([np.stack([np.pad(np.sort(rng.permutation(8)[:c]), (0, 8 - c),
                                   constant_values=-3) for c in row]) for row in count])
  ids, count = jnp.asarray(ids, jnp.int32), jnp.asarray(count, jnp.int32)
  lens = dict(kv_len=jnp.array([128, 100]), prefix_len=jnp.array([0, 40]),
              q_offset=jnp.array([126, 98]))
  read = bt.block_mask_from_tables(ids, count, 8)
  out = decode.sparse_decode(q, _poison(k, read), _poison(v, read), ids, count, **lens,
                             block_k=BLOCK_K, num_splits=1, interpret=True,
                             blocks_per_step=blocks_per_step, prefetch=prefetch)
  want = decode.sparse_decode_reference(q, k, v, ids, count, **lens, block_k=BLOCK_K)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert not np.any(np.asarray(out[0, :, :2]))     # the empty row: exactly 0


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
  with pytest.raises(ValueError, match=r'blocks_per_step=3 must be one of \(1, 2, 4\)'):
    decode.sparse_decode(q, k, v, kv_ids, kv_count, **lens, block_k=BLOCK_K,
                         blocks_per_step=3, interpret=True)


# --------------------------------------- scores + cutoff (sparse_decode_scored) ---

S_SCORED = 128               # 8 blocks: room for a budget between forced and all
N_SCORED = S_SCORED // BLOCK_K


@dataclasses.dataclass(frozen=True)
class ScoredCase:
  name: str
  new: int
  heads: tuple[int, int]
  kv_len: tuple[int, int]
  rule: str                  # block_cutoff.RULES
  cutoff: str                # 'random' | 'all' (every live block) | 'forced' (none else)
  prefix: tuple[int, int] = (0, 0)
  splits: int = 2
  dtype: str = 'float32'
  tied: bool = False         # scores in {-1, 0, 1}: ties at the top-k cutoff


SCORED_CASES = [
    ScoredCase('top_k_one_token_mha', 1, (2, 2), (128, 37), 'top_k', 'random'),
    ScoredCase('top_k_gqa8_ragged', 1, (8, 1), (100, 9), 'top_k', 'random', splits=3),
    ScoredCase('top_k_ties_gqa4', 2, (8, 2), (128, 75), 'top_k', 'random', tied=True),
    ScoredCase('keep_min_four_tokens_gqa4_prefix', 4, (8, 2), (70, 128), 'keep_min',
               'random', prefix=(66, 10)),
    ScoredCase('all_blocks_eight_tokens_bf16', 8, (4, 1), (128, 29), 'top_k', 'all',
               dtype='bfloat16'),
    ScoredCase('all_blocks_keep_min', 3, (4, 4), (111, 64), 'keep_min', 'all'),
    ScoredCase('forced_only_top_k', 2, (4, 2), (33, 120), 'top_k', 'forced', splits=1),
    ScoredCase('forced_only_keep_min', 1, (2, 1), (128, 50), 'keep_min', 'forced'),
    ScoredCase('more_splits_than_blocks', 3, (2, 1), (128, 21), 'top_k', 'random',
               splits=16),
]


def _scored_inputs(case, seed=0):
  hkv = case.heads[1]
  rng = np.random.default_rng(seed)
  q, k, v = _random_qkv(case, rng, S_SCORED)
  if case.tied:
    scores = rng.integers(-1, 2, (2, hkv, N_SCORED)).astype(np.float32)
  else:
    scores = rng.standard_normal((2, hkv, N_SCORED), np.float32)
  if case.rule == 'top_k':
    budget = {'random': rng.integers(0, N_SCORED, (2, hkv)),
              'all': np.full((2, hkv), N_SCORED), 'forced': np.zeros((2, hkv))}
    cutoff = jnp.asarray(budget[case.cutoff], jnp.int32)
  else:
    keep_min = {'random': rng.standard_normal((2, hkv)),
                'all': np.full((2, hkv), -np.inf), 'forced': np.full((2, hkv), np.inf)}
    cutoff = jnp.asarray(keep_min[case.cutoff], jnp.float32)
  kv_len = np.array(case.kv_len)
  lens = dict(kv_len=jnp.asarray(kv_len, jnp.int32),
              prefix_len=jnp.asarray(case.prefix, jnp.int32),
              q_offset=jnp.asarray(kv_len - case.new, jnp.int32))
  return q, k, v, jnp.asarray(scores), cutoff, lens


@pytest.mark.parametrize('case, blocks_per_step, prefetch', _loop_params(SCORED_CASES))
def test_scored_kernel_matches_reference(case, blocks_per_step, prefetch):
  q, k, v, scores, cutoff, lens = _scored_inputs(case)
  read = bc.kept_blocks_reference(scores, cutoff, lens['kv_len'], lens['q_offset'],
                                  block_k=BLOCK_K, rule=case.rule)
  out = decode.sparse_decode_scored(q, _poison(k, read), _poison(v, read), scores,
                                    cutoff, **lens, block_k=BLOCK_K, rule=case.rule,
                                    num_splits=case.splits,
                                    blocks_per_step=blocks_per_step, prefetch=prefetch,
                                    interpret=True)
  as32 = lambda x: x.astype(jnp.float32)
  want = decode.sparse_decode_scored_reference(as32(q), as32(k), as32(v), scores,
                                               cutoff, **lens, block_k=BLOCK_K,
                                               rule=case.rule)
  assert out.shape == q.shape and out.dtype == q.dtype
  tol = 1e-5 if case.dtype == 'float32' else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=tol, rtol=tol)


@pytest.mark.parametrize('rule', ['top_k', 'keep_min'])
def test_scored_reference_all_blocks_is_dense_attention(rule):
  case = dataclasses.replace(SCORED_CASES[3], rule=rule, cutoff='all')
  q, k, v, scores, cutoff, lens = _scored_inputs(case, seed=1)
  got = decode.sparse_decode_scored_reference(q, k, v, scores, cutoff, **lens,
                                              block_k=BLOCK_K, rule=rule)
  want = attention_ops.attend(q, k, v, attention_ops.MaskSpec(causal=True, **lens),
                              implementation='xla')
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scored_forced_only_reads_first_and_new_blocks():
  """Only block 0 and the new tokens' blocks: the same as listing them."""
  case = SCORED_CASES[6]                       # kv_len (33, 120), 2 new tokens
  q, k, v, scores, cutoff, lens = _scored_inputs(case, seed=2)
  got = decode.sparse_decode_scored(q, k, v, scores, cutoff, **lens, block_k=BLOCK_K,
                                    rule='top_k', interpret=True)
  # Tokens 31, 32 -> blocks {0, 1, 2}; tokens 118, 119 -> blocks {0, 7}.
  ids = jnp.array([[[0, 1, 2]] * 2, [[0, 7, 7]] * 2], jnp.int32)
  count = jnp.array([[3, 3], [2, 2]], jnp.int32)
  want = decode.sparse_decode_reference(q, k, v, ids, count, **lens, block_k=BLOCK_K)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scored_splits_do_not_change_the_result():
  q, k, v, scores, cutoff, lens = _scored_inputs(SCORED_CASES[1], seed=3)
  outs = [decode.sparse_decode_scored(q, k, v, scores, cutoff, **lens, block_k=BLOCK_K,
                                      rule='top_k', num_splits=n, interpret=True)
          for n in (1, 5)]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_scored_seam_triton_matches_reference():
  q, k, v, scores, cutoff, lens = _scored_inputs(SCORED_CASES[0], seed=4)
  mask = attention_ops.MaskSpec(causal=True, **lens)
  run = lambda impl: sparse_ops.sparse_decode_scored(
      q, k, v, mask, scores, cutoff, block_k=BLOCK_K, rule='top_k',
      implementation=impl)
  np.testing.assert_allclose(run('triton'), run('reference'), atol=1e-5, rtol=1e-5)


def test_scored_rejects_bad_inputs():
  q, k, v, scores, cutoff, lens = _scored_inputs(SCORED_CASES[0])
  mask = attention_ops.MaskSpec(causal=True, **lens)
  call = lambda s, c, rule='top_k': sparse_ops.sparse_decode_scored(
      q, k, v, mask, s, c, block_k=BLOCK_K, rule=rule, implementation='triton')
  with pytest.raises(ValueError, match=r'scores.shape=.* must be \(B, Hkv, S // block_k\)'):
    call(scores[..., :-1], cutoff)
  with pytest.raises(ValueError, match=r'cutoff.shape=.* must be \(B, Hkv\)'):
    call(scores, cutoff[:, :1])
  with pytest.raises(ValueError, match="rule='top_p' must be one of"):
    call(scores, cutoff, rule='top_p')
  with pytest.raises(ValueError, match='must be a multiple of block_k=16'):
    decode.sparse_decode_scored(q, k[:, :40], v[:, :40], scores, cutoff, **lens,
                                block_k=BLOCK_K, interpret=True)
  with pytest.raises(ValueError, match=r'prefetch=3 must be one of \(0, 1, 2\)'):
    decode.sparse_decode_scored(q, k, v, scores, cutoff, **lens, block_k=BLOCK_K,
                                prefetch=3, interpret=True)


def test_benchmark_fused_step_matches_reference():
  """benchmarks/attention.py's timed fused step (pooled-key scores, in-kernel
  top-k, kernel) on a tiny cache, against the reference on the same scores."""
  q, k, v, _, _, lens = _scored_inputs(SCORED_CASES[1], seed=5)   # no prefix
  pooled = bench.pool_keys(k, BLOCK_K)
  got = bench.fused_decode_step(q, k, v, pooled, **lens, budget=3, block_k=BLOCK_K,
                                interpret=True)
  want = decode.sparse_decode_scored_reference(
      q, k, v, bench.decode_scores(q, pooled), jnp.full((2, 1), 3), **lens,
      block_k=BLOCK_K, rule='top_k')
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_benchmark_decode_config_specs():
  assert bench.decode_config('4x3') == dict(num_splits=4, num_stages=3)
  assert bench.decode_config('0x2x4x0x2') == dict(num_splits=0, num_stages=2,
                                                  blocks_per_step=4, prefetch=2)
  assert bench.decode_config('8x3x2x16') == dict(num_splits=8, num_stages=3,
                                                 blocks_per_step=2, num_warps=16)
  with pytest.raises(ValueError, match='SPLITSxSTAGES'):
    bench.decode_config('4')


def test_benchmark_head_major_layout_is_the_same_step():
  """The benchmark's head-major variant (kv heads as batch rows) computes the
  same attention as the [B, S, Hkv, D] cache."""
  q, k, v, _, _, lens = _scored_inputs(SCORED_CASES[3], seed=6)   # GQA 4, 2 kv heads
  pooled = bench.pool_keys(k, BLOCK_K)
  args = (q, k, v, pooled, lens['kv_len'], lens['prefix_len'], lens['q_offset'])
  step = lambda *a: bench.fused_decode_step(*a, budget=3, block_k=BLOCK_K, interpret=True)
  b, m, hq, d = q.shape
  hkv = k.shape[2]
  got = step(*bench.head_major_decode_args(*args, hkv=hkv))
  got = got.reshape(b, hkv, m, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(q.shape)
  np.testing.assert_allclose(got, step(*args), atol=1e-5, rtol=1e-5)


def test_benchmark_chained_steps_feed_each_output_to_the_next():
  """bench.chained runs n steps in one program, each output the next query: the
  same as n calls one after another (here the fused step, interpreted)."""
  q, k, v, _, _, lens = _scored_inputs(SCORED_CASES[1], seed=7)
  pooled = bench.pool_keys(k, BLOCK_K)
  args = (k, v, pooled, lens['kv_len'], lens['prefix_len'], lens['q_offset'])
  step = lambda *a: bench.fused_decode_step(*a, budget=3, block_k=BLOCK_K, interpret=True)
  want = q
  for _ in range(3):
    want = jax.block_until_ready(step(want, *args).astype(q.dtype))
  np.testing.assert_allclose(bench.chained(step, 3)(q, *args), want, atol=1e-5, rtol=1e-5)


def test_benchmark_markdown_tabulates_chained_decode():
  if not flags.FLAGS.is_parsed():   # markdown reads the shape flags' defaults
    flags.FLAGS.mark_as_parsed()
  r = dict(batch=8, cache=32768, ms={'cudnn': 0.15}, tbps={'cudnn': 3.6},
           best_dense_ms=0.15, chain=8, chain_ms={'cudnn': 0.132, 'ours_s65': 0.066})
  text = bench.markdown([], [], [r], dict(device='GPU', jax='0', date='today'))
  assert 'Decode, 8 steps chained in one program' in text
  assert '| 8 x 32768 | ours_s65 | 0.0660 | 2.00x |' in text
