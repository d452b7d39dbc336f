"""Block-sparse decode attention, Pallas Triton: flash-decoding over the key
blocks a (batch, kv head) selected.

A decode step has M new tokens (M small, 1-8) per batch row. The G query heads
of one GQA group read the same K/V blocks, so the G x M (token, head) pairs of
a group are the rows of one tile -- row r = m * G + g, padded to a power of two
>= 16 because Triton dots need 16 rows -- and each K/V block is loaded once
for all of them.

One block list is far too little work for one program, so the list is split
(flash-decoding): grid (B, Hkv, splits); split i takes the i-th contiguous
slice of kv_ids[b, h, :kv_count[b, h]], slices of ceil(count / splits) blocks,
so the slices of a row differ by at most one block. Each split writes its
normalised partial output and row logsumexp; `combine` (jnp) merges them.

Masking: new token m sits at absolute position q_offset[b] + m and sees key j
iff j < kv_len[b] and (j < prefix_len[b] or j <= q_offset[b] + m).

`sparse_decode_scored` takes block scores [B, Hkv, nK] and a per-row cutoff
instead of block lists, so no top-k, sort or table building runs before it:
each program picks its own blocks (block_cutoff.kept_blocks, one row of
compares and sums) and visits the kept ones of its residue class j % splits ==
split. Interleaving, not contiguous slices, because a gate's kept blocks
cluster (the sink, the recent window, one topic's span): any cluster is spread
over all splits. Skipped blocks cost no loads; finding the next kept block is
one min over the row.

Both kernels step through their blocks blocks_per_step (n) at a time
(triton_common.attend_block_groups): a step issues the K/V loads of n blocks,
then one online-softmax update over all of them, so n blocks share a step's
cross-warp reductions and barriers (~11 a step for n = 1 in the sm_90 PTX of
Triton 3.9) and more bytes are in flight. Measured on an H100 (2026-11-25,
batch 8, cache 32k, 65% skipped): no config of n, prefetch, warps, splits or
stages beat the defaults beyond run-to-run noise (0.089-0.105 ms for the
table kernel alone, ~2 TB/s; docs/results.md). A count that is not a
multiple of n ends in masked slots that re-read a block of the program.
Triton's pipeliner keeps num_stages - 1 steps of K/V in shared memory, i.e.
(num_stages - 1) * n * 32 KB at block_k 64, D 128, bf16: n = 4 needs
num_stages <= 2 on an H100 (227 KB).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.sparse_attention import block_cutoff
from pallas_kernels.sparse_attention import triton_common as tc
from pallas_kernels.sparse_attention.block_tables import block_mask_from_tables, check_qkv

# Default programs per call, (B, Hkv, splits): ~2 per SM of an H100 (132 SMs).
_PROGRAMS = 256
# The loop shapes both kernels take (_check_loop_options).
BLOCKS_PER_STEP = (1, 2, 4)
PREFETCH = tc.PREFETCH


def _row_positions(q_offset, rows, group, new):
  """Absolute positions [R] of the grouped rows: row r is token
  min(r // G, M - 1) (padding rows repeat the last token; they are dropped)."""
  token = jnp.minimum(lax.div(jnp.arange(rows, dtype=jnp.int32), group), new - 1)
  return q_offset + token


def _decode_kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, kv_len_ref, prefix_ref,
                   offset_ref, o_ref, lse_ref, *, sm_scale, block_k, num_splits,
                   group, new, blocks_per_step, prefetch):
  """q_ref [R, D]; k_ref/v_ref [S, D]; ids_ref [max_k]; o_ref [R, D]; lse_ref [R]."""
  count = count_ref[...]
  chunk = lax.div(count + num_splits - 1, num_splits)   # count >= 0
  lo = jnp.minimum(pl.program_id(2) * chunk, count)
  hi = jnp.minimum(lo + chunk, count)
  q = q_ref[...]
  q_pos = _row_positions(offset_ref[...], q.shape[0], group, new)
  n, last_block = blocks_per_step, k_ref.shape[0] // block_k - 1

  def ids_at(p):
    """Table entries p .. p + n - 1; past hi, entry hi - 1 again (read anyway).
    The clamps keep even an empty split's prefetch (prefetch 2) in bounds."""
    pos = [jnp.maximum(jnp.minimum(p + t, hi - 1), 0) for t in range(n)]
    starts = [pl.multiple_of(jnp.clip(ids_ref[i], 0, last_block) * block_k, block_k)
              for i in pos]
    return p + n, (starts, jnp.clip(hi - p, 0, n))

  out, lse = tc.attend_block_groups(
      q, k_ref, v_ref, ids_at, lo, lax.div(hi - lo + n - 1, n), q_pos,
      kv_len_ref[...], prefix_ref[...], sm_scale=sm_scale, block_k=block_k,
      prefetch=prefetch)
  o_ref[...] = out
  lse_ref[...] = lse


def _scored_kernel(q_ref, k_ref, v_ref, scores_ref, cutoff_ref, kv_len_ref,
                   prefix_ref, offset_ref, o_ref, lse_ref, *, sm_scale, block_k,
                   num_splits, group, new, rule, blocks_per_step, prefetch):
  """Like _decode_kernel, with scores_ref [N] and the row's cutoff in place of
  a block list: visits the kept blocks j with j % num_splits == split."""
  q, q_offset = q_ref[...], offset_ref[...]
  q_pos = _row_positions(q_offset, q.shape[0], group, new)
  kv_len, prefix_len = kv_len_ref[...], prefix_ref[...]
  kept = block_cutoff.kept_blocks(scores_ref[...], cutoff_ref[...], kv_len,
                                  q_offset, block_k=block_k, rule=rule)
  idx = jnp.arange(kept.shape[0], dtype=jnp.int32)
  mine = kept & (lax.rem(idx, num_splits) == pl.program_id(2))
  n = blocks_per_step

  def next_kept(last):
    """The next n of my kept blocks after block `last` (-1: none yet). Once
    they run out, a slot repeats the previous one (read anyway), or block 0
    in a program with no block at all."""
    starts, n_live = [], 0
    for _ in range(n):
      j = jnp.min(jnp.where(mine & (idx > last), idx, kept.shape[0]))
      live = j < kept.shape[0]
      last = jnp.where(live, j, last)
      n_live = n_live + live.astype(jnp.int32)
      starts.append(pl.multiple_of(jnp.maximum(last, 0) * block_k, block_k))
    return last, (starts, n_live)

  count = jnp.sum(mine.astype(jnp.int32))
  o_ref[...], lse_ref[...] = tc.attend_block_groups(
      q, k_ref, v_ref, next_kept, jnp.int32(-1), lax.div(count + n - 1, n), q_pos,
      kv_len, prefix_len, sm_scale=sm_scale, block_k=block_k, prefetch=prefetch)


def combine(out, lse, axis):
  """Merge split-K partials: out [..., R, D] normalised per split, lse [..., R].

  Splits that saw no visible key have lse -inf and weigh 0; a row no split
  saw stays 0.
  """
  top = jnp.max(lse, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight = jnp.exp(lse - top)                                  # 0 where -inf
  total = jnp.sum(weight, axis=axis)
  merged = jnp.sum(weight[..., None] * out, axis=axis)
  return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _merge_window_kernel(out_ref, lse_ref, o_ref, *, group, per_window):
  """combine over the partials [P, W, D] of one (batch, kv head), its own G
  rows: window rows (h % per_window) * G + [0, G)."""
  rows = pl.ds(lax.rem(pl.program_id(1), per_window) * group, group)
  merged = combine(out_ref[:, rows, :].astype(jnp.float32), lse_ref[:, rows], axis=0)
  o_ref[...] = merged.astype(o_ref.dtype)


def merge_windows(out, lse, *, group, per_window, dtype, interpret=False):
  """combine(out[..., own rows, :], lse[..., own rows], axis=2) in one Triton
  kernel, for partials that hold a window of W query rows of which a kv head
  owns G (mosaic_gpu_decode): out [B, Hkv, P, W, D], lse [B, Hkv, P, W] ->
  [B, Hkv, G, D] in dtype. XLA makes two or three kernels of the same
  (slices, then two reductions). P, W, G and D must be powers of two
  (Triton's blocks); `mergeable` says whether they are."""
  b, hkv, parts, window, d = out.shape
  return pl.pallas_call(
      functools.partial(_merge_window_kernel, group=group, per_window=per_window),
      grid=(b, hkv),
      in_specs=[pl.BlockSpec((None, None, parts, window, d), lambda i, h: (i, h, 0, 0, 0)),
                pl.BlockSpec((None, None, parts, window), lambda i, h: (i, h, 0, 0))],
      out_specs=pl.BlockSpec((None, None, group, d), lambda i, h: (i, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, group, d), dtype),
      compiler_params=tc.compiler_params(d, 4, 1),
      interpret=interpret,
      name='merge_windows',
  )(out, lse)


def mergeable(*sizes):
  """Whether merge_windows takes these block sizes (all powers of two)."""
  return all(n > 0 and n & (n - 1) == 0 for n in sizes)


def _check_shapes(q, k_cache, v_cache, kv_ids, kv_count, block_k):
  b, d = q.shape[0], q.shape[3]
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  check_qkv(q, k_cache, v_cache)
  if s % block_k:
    raise ValueError(f'cache length {s} must be a multiple of {block_k=}')
  tc.check_pow2(block_k=block_k, head_dim=d)
  if kv_ids.ndim != 3 or kv_ids.shape[:2] != (b, hkv) or kv_count.shape != (b, hkv):
    raise ValueError(f'{kv_ids.shape=} / {kv_count.shape=} must be '
                     f'(B, Hkv, max_k) / (B, Hkv) with (B, Hkv)={(b, hkv)}')


def check_scored_inputs(q, k_cache, v_cache, scores, cutoff, *, block_k, rule):
  """What sparse_decode_scored and its reference need; the errors name the
  argument."""
  b, s, hkv = q.shape[0], k_cache.shape[1], k_cache.shape[2]
  check_qkv(q, k_cache, v_cache)
  if s % block_k:
    raise ValueError(f'cache length {s} must be a multiple of {block_k=}')
  if scores.shape != (b, hkv, s // block_k):
    raise ValueError(f'{scores.shape=} must be (B, Hkv, S // block_k)='
                     f'{(b, hkv, s // block_k)}')
  if cutoff.shape != (b, hkv):
    raise ValueError(f'{cutoff.shape=} must be (B, Hkv)={(b, hkv)}')
  if rule not in block_cutoff.RULES:
    raise ValueError(f'{rule=} must be one of {block_cutoff.RULES}')


def _check_loop_options(blocks_per_step, prefetch):
  """blocks_per_step: key blocks per loop step, all loaded before any dot
  (more bytes in flight per program); prefetch: tc.attend_block_groups."""
  if blocks_per_step not in BLOCKS_PER_STEP:
    raise ValueError(f'{blocks_per_step=} must be one of {BLOCKS_PER_STEP}')
  if prefetch not in PREFETCH:
    raise ValueError(f'{prefetch=} must be one of {PREFETCH}')


def _group_rows(q, hkv):
  """[B, M, Hq, D] -> [B, Hkv, R, D], row m * G + g, zero rows up to R."""
  b, m, hq, d = q.shape
  rows = m * (hq // hkv)
  q = q.reshape(b, m, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
  q = q.reshape(b, hkv, rows, d)
  padded = max(16, pl.next_power_of_2(rows))
  return jnp.pad(q, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))


def _scale(sm_scale, head_dim):
  return head_dim ** -0.5 if sm_scale is None else sm_scale


def _default_splits(b, hkv, blocks):
  return min(blocks, pl.cdiv(_PROGRAMS, b * hkv))


def _split_decode(kernel, q, k_cache, v_cache, row_vector, row_scalar, kv_len,
                  prefix_len, q_offset, *, splits, name, compiler_params, interpret):
  """Runs `kernel` on the grid (B, Hkv, splits) and merges its splits into
  [B, M, Hq, D] in q.dtype.

  A program reads its grouped q rows [R, D], the K/V cache of its (b, kv head)
  [S, D], its row of row_vector [B, Hkv, W] and of row_scalar [B, Hkv], and its
  kv_len, prefix_len and q_offset; it writes its normalised partial output
  [R, D] and logsumexp [R]. `kernel` also gets the row layout (group, new).
  """
  b, m, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  group = hq // hkv
  q_rows = _group_rows(q, hkv)
  rows = q_rows.shape[2]
  kv_spec = pl.BlockSpec((None, s, None, d), lambda bi, h, i: (bi, 0, h, 0))
  in_specs = [
      pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, 0, 0)),
      kv_spec, kv_spec,
      pl.BlockSpec((None, None, row_vector.shape[-1]), lambda bi, h, i: (bi, h, 0)),
      pl.BlockSpec((None, None), lambda bi, h, i: (bi, h)),
  ] + [tc.batch_scalar_spec()] * 3
  out_specs = [
      pl.BlockSpec((None, None, None, rows, d), lambda bi, h, i: (bi, h, i, 0, 0)),
      pl.BlockSpec((None, None, None, rows), lambda bi, h, i: (bi, h, i, 0)),
  ]
  out, lse = pl.pallas_call(
      functools.partial(kernel, group=group, new=m),
      grid=(b, hkv, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
      compiler_params=compiler_params,
      interpret=interpret,
      name=name,
  )(q_rows, k_cache, v_cache, row_vector, row_scalar,
    *(jnp.asarray(x, jnp.int32) for x in (kv_len, prefix_len, q_offset)))
  # Merge only the M * G real rows: the padding rows would be most of the bytes.
  real = m * group
  out = combine(out[..., :real, :], lse[..., :real], axis=2)      # [B, Hkv, M*G, D]
  out = out.reshape(b, hkv, m, group, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, m, hq, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=(
    'block_k', 'num_splits', 'sm_scale', 'interpret', 'num_warps', 'num_stages',
    'blocks_per_step', 'prefetch'))
def sparse_decode(q, k_cache, v_cache, kv_ids, kv_count, kv_len, prefix_len,
                  q_offset, *, block_k: int, num_splits: int | None = None,
                  sm_scale: float | None = None, interpret: bool = False,
                  num_warps: int | None = None, num_stages: int = 2,
                  blocks_per_step: int = 1, prefetch: int = 0):
  """Decode attention over selected cache blocks; [B, M, Hq, D] in q.dtype.

  q [B, M, Hq, D] new tokens; k_cache, v_cache [B, S, Hkv, D]; kv_ids
  [B, Hkv, max_k] selected key blocks (of block_k keys), kv_count [B, Hkv];
  kv_len, prefix_len, q_offset int [B]. num_splits None: enough splits for
  ~256 programs, at most max_k. Rows with no visible key output 0.
  blocks_per_step, prefetch: loop shape (_check_loop_options,
  triton_common.attend_block_groups); (1, 0) reads one block per step and
  its id in the same step.
  """
  _check_shapes(q, k_cache, v_cache, kv_ids, kv_count, block_k)
  _check_loop_options(blocks_per_step, prefetch)
  b, d, hkv = q.shape[0], q.shape[3], k_cache.shape[2]
  splits = num_splits or _default_splits(b, hkv, kv_ids.shape[-1])
  kernel = functools.partial(_decode_kernel, sm_scale=_scale(sm_scale, d),
                             block_k=block_k, num_splits=splits,
                             blocks_per_step=blocks_per_step, prefetch=prefetch)
  return _split_decode(
      kernel, q, k_cache, v_cache, tc.pad_ids(kv_ids), kv_count.astype(jnp.int32),
      kv_len, prefix_len, q_offset, splits=splits, name='sparse_decode',
      compiler_params=tc.compiler_params(d, num_warps, num_stages),
      interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    'block_k', 'rule', 'num_splits', 'sm_scale', 'interpret', 'num_warps',
    'num_stages', 'blocks_per_step', 'prefetch'))
def sparse_decode_scored(q, k_cache, v_cache, scores, cutoff, kv_len, prefix_len,
                         q_offset, *, block_k: int, rule: str = 'keep_min',
                         num_splits: int | None = None,
                         sm_scale: float | None = None, interpret: bool = False,
                         num_warps: int | None = None, num_stages: int = 3,
                         blocks_per_step: int = 1, prefetch: int = 1):
  """Decode attention over the cache blocks the scores keep; [B, M, Hq, D].

  scores f32 [B, Hkv, S // block_k] per-block scores; cutoff [B, Hkv] the
  row's keep_min (rule 'keep_min') or its budget of non-forced blocks (rule
  'top_k'); block_cutoff says which blocks a row reads. Needs kv_len <= S and
  q_offset >= 0; the rest as in sparse_decode. num_splits None: enough splits
  for ~256 programs, at most S // block_k. num_stages 3: Triton's pipeliner
  then double-buffers K/V, so the next kept block loads while this one is
  computed (with 2 it gets one buffer and issues the next load only after
  the current block's dots). blocks_per_step, prefetch as in sparse_decode;
  (1, 1) reads one block per step, found during the previous step.
  """
  check_scored_inputs(q, k_cache, v_cache, scores, cutoff, block_k=block_k, rule=rule)
  _check_loop_options(blocks_per_step, prefetch)
  tc.check_pow2(block_k=block_k, head_dim=q.shape[3])
  b, d, hkv, n_k = q.shape[0], q.shape[3], k_cache.shape[2], scores.shape[-1]
  splits = num_splits or _default_splits(b, hkv, n_k)
  # A power-of-two row for Triton; padded blocks start past S, so never live.
  width = pl.next_power_of_2(n_k)
  scores = jnp.pad(scores.astype(jnp.float32), ((0, 0), (0, 0), (0, width - n_k)))
  cutoff = cutoff.astype(jnp.float32 if rule == 'keep_min' else jnp.int32)
  kernel = functools.partial(_scored_kernel, sm_scale=_scale(sm_scale, d),
                             block_k=block_k, num_splits=splits, rule=rule,
                             blocks_per_step=blocks_per_step, prefetch=prefetch)
  return _split_decode(
      kernel, q, k_cache, v_cache, scores, cutoff, kv_len, prefix_len, q_offset,
      splits=splits, name='sparse_decode_scored',
      compiler_params=tc.compiler_params(d, num_warps, num_stages),
      interpret=interpret)


def _decode_over_blocks(q, k_cache, v_cache, blocks, kv_len, prefix_len, q_offset,
                        *, block_k, sm_scale):
  """Plain-jnp decode attention ([B, Hkv, G, M, S] logits) over the key blocks
  of the bool mask blocks [B, Hkv, nK]."""
  b, m, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  keys = jnp.repeat(blocks, block_k, axis=-1)[:, :, None, None]      # [B,Hkv,1,1,S]
  col = lambda x: jnp.asarray(x, jnp.int32)[:, None, None]
  pos = col(q_offset) + jnp.arange(m)[None, :, None]                 # [B, M, 1]
  j = jnp.arange(s)
  elem = (j < col(kv_len)) & ((j < col(prefix_len)) | (j <= pos))  # [B, M, S]
  seen = keys & elem[:, None, None]

  qg = q.reshape(b, m, hkv, hq // hkv, d).astype(jnp.float32)
  logits = jnp.einsum('bmhgd,bshd->bhgms', qg, k_cache.astype(jnp.float32))
  logits = logits * _scale(sm_scale, d)
  top = jnp.max(jnp.where(seen, logits, -jnp.inf), axis=-1, keepdims=True)
  p = jnp.where(seen, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum('bhgms,bshd->bmhgd', p, v_cache.astype(jnp.float32))
  return out.reshape(b, m, hq, d).astype(q.dtype)


def sparse_decode_reference(q, k_cache, v_cache, kv_ids, kv_count, kv_len,
                            prefix_len, q_offset, *, block_k: int,
                            sm_scale: float | None = None):
  """Plain-jnp, dense ground truth for sparse_decode."""
  blocks = block_mask_from_tables(kv_ids, kv_count, k_cache.shape[1] // block_k)
  return _decode_over_blocks(q, k_cache, v_cache, blocks, kv_len, prefix_len,
                             q_offset, block_k=block_k, sm_scale=sm_scale)


def sparse_decode_scored_reference(q, k_cache, v_cache, scores, cutoff, kv_len,
                                   prefix_len, q_offset, *, block_k: int,
                                   rule: str = 'keep_min',
                                   sm_scale: float | None = None):
  """Plain-jnp, dense ground truth for sparse_decode_scored: the blocks of
  block_cutoff.kept_blocks_reference (a sort), then masked softmax."""
  check_scored_inputs(q, k_cache, v_cache, scores, cutoff, block_k=block_k, rule=rule)
  blocks = block_cutoff.kept_blocks_reference(scores, cutoff, kv_len, q_offset,
                                              block_k=block_k, rule=rule)
  return _decode_over_blocks(q, k_cache, v_cache, blocks, kv_len, prefix_len,
                             q_offset, block_k=block_k, sm_scale=sm_scale)
