"""The learned gate's decode-step selection in one Pallas-Triton kernel.

A sparse decode step of the model (models/gate.py, BlockGate.select_decode)
scores its new tokens against every cached key block's gate key, turns the
logits into probabilities over key blocks (a softmax per query head, averaged
over the GQA group) and keeps blocks by the gate's rule (threshold, top-k
budget, coverage). In XLA that is ~30 small kernels, ~70 us of a layer's
~120 us of kernels a step at batch 8, cache 32k (H200,
benchmarks/layer_decode.py); the sparse decode kernel itself is ~48. The
logits stay in XLA (two einsums); this kernel takes them from there.

Every rule keeps a prefix of one order: forced blocks (block 0 and the new
tokens' own) first, then the rest by probability, higher first, ties to the
lower block (lax.top_k's and a stable sort's order):
- threshold: p >= threshold * (the row's largest p): a prefix by p;
- top_k: the first top_k non-forced blocks;
- coverage: the blocks whose mass ahead (forced blocks' plus the non-forced
  blocks' ahead of them) is still below `coverage` (top-p).
So a block's slot is its rank in that order, and whether it is kept needs
only its rank, its p and the mass ahead of it: program (b, h, c) ranks chunk
c's blocks against the row, `chunk` blocks at a time, as
select_triton.decode_ranked_tables does, and no program waits for another.

Consistency between a row's programs: each computes the row's softmax
statistics from the same logits at the same shape, and the probabilities of
its own chunk and of each span it ranks them against at one shape too ([G,
chunk]), so a block has the same bits wherever it is computed (at another
shape a reduction may round differently, and a block could outrank itself).
Every block, kept or not, is written at its rank's slot (those below the
table width): the ids are the row's blocks in rank order, so every slot below
the count holds a real block even if rounding made the kept set other than a
prefix. The count is the kept blocks' number, summed over the row's programs
by an atomic add into a zeroed count.

The plain-jnp reference (decode_tables_reference) computes the same from a
sort; against BlockGate.select_decode and compact_rows it keeps the same
blocks up to rounding (tests/pallas_kernels/test_gate_select.py).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention import block_tables as bt

# An invisible block's gate logit, as ops.sparse_gate's: large but finite.
INVISIBLE_LOGIT = -1e9
# Programs decode_tables aims for: about one an SM of an H100 or H200.
PROGRAMS = 128


def block_rule(n_k, block_k, num_new, q_offset, kv_len, prefix_len, *, causal):
  """(visible, forced) bool [B, n_k] of a decode step's key blocks: visible
  holds a key the new tokens at q_offset.. may see (ops.sparse_gate.
  visible_tiles with one query tile); forced, the visible ones among block 0
  and those holding the new tokens (forced_decode_blocks)."""
  col = lambda x: jnp.asarray(x, jnp.int32)[:, None]
  k0 = jnp.arange(n_k) * block_k
  return _rule(k0, block_k, num_new, col(q_offset), col(kv_len), col(prefix_len), causal)


def _rule(k0, block_k, num_new, q_offset, kv_len, prefix_len, causal):
  visible = k0 < kv_len
  if causal:
    visible &= (k0 < prefix_len) | (k0 <= q_offset + num_new - 1)
  forced = ((k0 < q_offset + num_new) & (k0 + block_k > q_offset)) | (k0 == 0)
  return visible, forced & visible


def keep_reference(p, visible, forced, *, threshold, top_k, coverage):
  """(order [..., nK], kept count [...]) by a sort: blocks in rank order, and
  how many of the first are kept (the kept set is a prefix of the order)."""
  n_k = p.shape[-1]
  p = jnp.where(visible, p, 0.0)
  order = jnp.argsort(-jnp.where(forced, jnp.inf, jnp.where(visible, p, -jnp.inf)),
                      axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order, axis=-1)
  p_s, vis_s, forced_s = take(p), take(visible), take(forced)
  n_forced = forced.sum(-1, keepdims=True)
  free = vis_s & ~forced_s
  keep = free & (p_s >= threshold * p.max(-1, keepdims=True))
  if top_k > 0:
    keep &= jnp.arange(n_k) - n_forced < top_k
  if coverage > 0:
    mass = jnp.where(free, p_s, 0.0)
    ahead = (p * forced).sum(-1, keepdims=True) + jnp.cumsum(mass, axis=-1) - mass
    keep &= ahead < coverage
  return order, (keep | forced_s).sum(-1, dtype=jnp.int32)


def decode_tables_reference(logits, q_offset, kv_len, prefix_len, *, causal, block_k,
                            num_new, threshold, top_k, coverage, max_k):
  """decode_tables in plain jnp: (ids [B, Hkv, max_k] in rank order, count
  [B, Hkv])."""
  n_k = logits.shape[-1]
  visible, forced = block_rule(n_k, block_k, num_new, q_offset, kv_len, prefix_len,
                               causal=causal)
  visible, forced = visible[:, None], forced[:, None]
  logits = jnp.where(visible[:, :, None], logits, INVISIBLE_LOGIT)
  p = jax.nn.softmax(logits, axis=-1).mean(2)
  order, count = keep_reference(p, visible, forced, threshold=threshold, top_k=top_k,
                                coverage=coverage)
  return order[..., :max_k].astype(jnp.int32), count


def _kernel(logits_ref, offset_ref, kv_len_ref, prefix_ref, threshold_ref, coverage_ref, _,
            ids_ref, count_ref, *, n_k, group, block_k, num_new, chunk, causal, top_k,
            use_coverage):
  """Program (b, h, c): chunk c's blocks ranked against the row of logits
  [G', W] (the group's `group` heads, padded to G' a power of two), `chunk`
  blocks a step: each written at its rank's slot, the kept ones counted into
  count_ref."""
  width = logits_ref.shape[1]
  offset = offset_ref[...]

  def rule_of(start, size):
    idx = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    visible, forced = _rule(idx * block_k, block_k, num_new, offset, kv_len_ref[...],
                            prefix_ref[...], causal)
    return idx, visible & (idx < n_k), forced & (idx < n_k)

  # The softmax statistics of each head over the visible blocks: [G, 1] each.
  visible_row = rule_of(0, width)[1][None, :]
  row = jnp.where(visible_row, logits_ref[...], INVISIBLE_LOGIT)
  peak = jnp.max(row, axis=1, keepdims=True)
  total = jnp.sum(jnp.exp(row - peak), axis=1, keepdims=True)
  # A padding head's softmax counts for nothing in the group's mean.
  real_head = jax.lax.broadcasted_iota(jnp.int32, (logits_ref.shape[0], 1), 0) < group
  total = jnp.where(real_head, total, jnp.inf)

  def keys_of(start):
    """Blocks [start, start + chunk): order keys, ids, p, visible, forced."""
    idx, visible, forced = rule_of(start, chunk)
    logits = logits_ref[:, pl.ds(start, chunk)]
    p = jnp.sum(jnp.exp(logits - peak) / total, axis=0) / group
    p = jnp.where(visible, p, 0.0)
    key = bt.total_order_key(jnp.where(forced, jnp.inf, jnp.where(visible, p, -jnp.inf)))
    return key, idx, p, visible, forced

  own_key, own_idx, own_p, own_visible, own_forced = keys_of(pl.program_id(2) * chunk)

  def against(i, carry):
    rank, mass, best, forced_mass, n_forced = carry
    key, idx, p, visible, forced = keys_of(i * chunk)
    beats = bt.ahead(own_key, own_idx, key, idx)
    rank += jnp.sum(beats.astype(jnp.int32), axis=1)
    if use_coverage:
      free = (visible & ~forced)[None, :]
      mass += jnp.sum(jnp.where(beats & free, p[None, :], 0.0), axis=1)
      forced_mass += jnp.sum(jnp.where(forced, p, 0.0))
    return (rank, mass, jnp.maximum(best, jnp.max(p)), forced_mass,
            n_forced + jnp.sum(forced.astype(jnp.int32)))

  init = (jnp.zeros((chunk,), jnp.int32), jnp.zeros((chunk,), jnp.float32), jnp.float32(0),
          jnp.float32(0), jnp.int32(0))
  rank, mass, best, forced_mass, n_forced = jax.lax.fori_loop(
      0, width // chunk, against, init)
  keep = own_p >= threshold_ref[...] * best
  if top_k > 0:
    keep &= rank - n_forced < top_k
  if use_coverage:
    keep &= forced_mass + mass < coverage_ref[...]
  keep = own_visible & (own_forced | keep)

  # Every block at its rank's slot (padding blocks as the last real one); lanes
  # past the table aim past it: masked on a GPU, dropped by the interpreter.
  out = rank < ids_ref.shape[0]
  plgpu.store(ids_ref.at[jnp.where(out, rank, ids_ref.shape[0])],
              jnp.minimum(own_idx, n_k - 1), mask=out)
  plgpu.atomic_add(count_ref, jnp.int32(0), jnp.sum(keep.astype(jnp.int32)))


def launch(rows: int, width: int) -> tuple[int, int]:
  """decode_tables' default (chunk, num_warps) for `rows` rows of `width`
  blocks: chunks of a power of two in [32, 128] that make about PROGRAMS
  programs. On an H200 (gate_select's kernel alone, top-k / coverage, us):
  batch 8 x 512 blocks x 4 kv heads, chunks of 128: 8.3 / 14.1 (64: 13.2 /
  21.5, 16: 153 / 206: a chunk is also the step the row is ranked in); 1 x
  512 x 4, chunks of 32: 8.5 / 10.3 (16: 38 / 42); 8 x 128 x 4, 32: 3.7 / 5.0."""
  chunk = pl.next_power_of_2(max(1, rows * width // PROGRAMS))
  chunk = min(128, max(32, chunk), width)
  return chunk, 8 if chunk >= 64 else 4


@functools.partial(jax.jit, static_argnames=(
    'causal', 'block_k', 'num_new', 'top_k', 'use_coverage', 'max_k', 'group', 'chunk',
    'interpret', 'num_warps'))
def decode_tables(logits, q_offset, kv_len, prefix_len, threshold, coverage, *, causal: bool,
                  block_k: int, num_new: int, top_k: int, use_coverage: bool, max_k: int,
                  group: int | None = None, chunk: int | None = None, interpret: bool = False,
                  num_warps: int | None = None):
  """A decode step's selection from the gate's logits in one kernel: (ids
  [B, Hkv, W'] in rank order, count [B, Hkv]).

  logits f32 [B, Hkv, G, nK]: each query head's gate logits over the cached
  key blocks of block_k keys; the num_new new tokens start at q_offset;
  q_offset, kv_len, prefix_len int [B] (the MaskSpec's; prefix_len only read
  if causal); threshold, coverage f32 scalars (arrays: a sweep does not
  recompile); top_k the budget of non-forced blocks (0: none); use_coverage
  whether the coverage rule runs (with coverage 0 it keeps forced blocks
  only). ids: W' is max_k rounded up to a power of two; slots below the
  count hold the kept blocks, the rest other blocks of the row. group: the
  real heads, the first of logits' G (None: all; gate_step's logits come
  padded to a power of two). chunk / num_warps None: launch's (about one
  program an SM).
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
  b, hkv, heads, n_k = logits.shape
  group = group or heads
  if not 1 <= group <= heads:
    raise ValueError(f'decode_tables: {group=} must be in [1, {heads}] (logits {logits.shape})')
  if not 1 <= max_k <= n_k:
    raise ValueError(f'decode_tables: {max_k=} must be in [1, {n_k=}]')
  width = pl.next_power_of_2(n_k)
  auto_chunk, auto_warps = launch(b * hkv, width)
  chunk, num_warps = min(chunk or auto_chunk, width), num_warps or auto_warps
  if chunk & (chunk - 1):
    raise ValueError(f'decode_tables: {chunk=} must be a power of two')
  # Triton's blocks are powers of two: pad the blocks (past n_k: invisible)
  # and the group (its padding heads masked in the kernel).
  logits = jnp.pad(logits, ((0, 0), (0, 0), (0, pl.next_power_of_2(heads) - heads),
                            (0, width - n_k)))
  row = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b,))
  scalar = lambda x: jnp.asarray(x, jnp.float32).reshape(1)
  per_row = pl.BlockSpec((None,), lambda bi, h, c: (bi,))
  one = pl.BlockSpec((None,), lambda bi, h, c: (0,))
  count_spec = pl.BlockSpec((None, None, 1), lambda bi, h, c: (bi, h, 0))
  out_width = pl.next_power_of_2(max_k)
  ids, count = pl.pallas_call(
      functools.partial(_kernel, n_k=n_k, group=group, block_k=block_k, num_new=num_new,
                        chunk=chunk, causal=causal, top_k=top_k, use_coverage=use_coverage),
      grid=(b, hkv, width // chunk),
      in_specs=[pl.BlockSpec((None, None, logits.shape[2], width),
                             lambda bi, h, c: (bi, h, 0, 0)),
                per_row, per_row, per_row, one, one, count_spec],
      out_specs=[pl.BlockSpec((None, None, out_width), lambda bi, h, c: (bi, h, 0)),
                 count_spec],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, out_width), jnp.int32),
                 jax.ShapeDtypeStruct((b, hkv, 1), jnp.int32)],
      input_output_aliases={6: 1},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(logits, row(q_offset), row(kv_len), row(prefix_len), scalar(threshold), scalar(coverage),
    jnp.zeros((b, hkv, 1), jnp.int32))
  return ids, count[..., 0]
