"""A decode step's learned gate up to its logits, in one Pallas-Triton kernel.

A sparse decode step of the model (models/gate.py) folds its new key into the
cached statistics of the key block it lands in (max, min, sum of the
pre-rotary keys), re-projects that block's gate key (its pooled statistics
through the per-kv-head projection, rotated at the block's first position),
projects and rotates the new token's query per query head, and scores it
against every cached gate key. In XLA that is ~11 small kernels, ~22 us a
step at batch 8, cache 32k on an H200 (benchmarks/layer_decode.py), more than
the selection kernel after it (gate_select.py) and half the sparse attention
kernel. Here it is one launch.

Program (b, h, c) computes the group's gate queries and the logits of key
blocks [c * chunk, (c + 1) * chunk); the program whose chunk holds the new
token's block also folds the key and writes the block's statistics and gate
key back (in place: input_output_aliases), and scores the new gate key from
its registers, so no program reads a row another one writes. A token at or
past kv_len is padding: nothing is folded or rewritten.

One new token a step (the model's decode steps); the plain-jnp reference
(decode_logits_reference) is the model's XLA path written out (fold_key_stats,
pooled_key_stats, _gate_keys, _logits: tests/pallas_kernels/test_gate_step.py
checks both against it).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.gate_select import PROGRAMS


def rotate(x1, x2, position, freq):
  """Rotary embedding of a vector split in halves x1, x2 (layers.rope's
  half-split pairs) at `position`: freq the half's inverse frequencies."""
  angle = jnp.asarray(position, jnp.float32) * freq
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _project(x, weight, half):
  """x [n] f32 through a transposed weight [2 * half, n] (weight(rows): those
  rows, one ref index, as Triton's lowering takes): its two halves, [half]
  each. Transposed, each sum runs along a row, within a warp (summing down
  columns, across warps, was slower on an H200 in an untracked A/B)."""
  w = lambda start: weight(pl.ds(start, half)).astype(jnp.float32)
  return jnp.sum(w(0) * x[None, :], axis=1), jnp.sum(w(half) * x[None, :], axis=1)


def _kernel(q_offset_ref, kv_len_ref, freq_ref, q_ref, k_ref, wq_ref, wk_ref, max_ref, min_ref,
            sum_ref, key_ref, logits_ref, max_out, min_out, sum_out, key_out, *, n_k, block_k,
            chunk):
  """Program (b, h, c): logits [G', chunk] of chunk c's key blocks (rows past
  the group's G zero), and (if it holds the new token's block) that block's
  statistics and gate key."""
  group, d = q_ref.shape
  half = key_ref.shape[-1] // 2
  q_offset, kv_len, freq = q_offset_ref[...], kv_len_ref[...], freq_ref[...]
  block = jnp.minimum(q_offset // block_k, n_k - 1)
  start = pl.program_id(2) * chunk
  owner = (q_offset < kv_len) & (block >= start) & (block < start + chunk)

  def fold_and_project():
    """The block's statistics with the new key, and its new gate key halves."""
    k = k_ref[...].astype(jnp.float32)
    hi = jnp.maximum(max_ref[block, :], k)
    lo = jnp.minimum(min_ref[block, :], k)
    total = sum_ref[block, :] + k
    count = jnp.clip(kv_len - block * block_k, 0, block_k)
    pooled = (jnp.where(count > 0, hi, 0.0), jnp.where(count > 0, lo, 0.0),
              total / jnp.maximum(count, 1).astype(jnp.float32))
    parts = [_project(x, lambda rows, i=i: wk_ref[rows, pl.ds(i * d, d)], half)
             for i, x in enumerate(pooled)]
    key = rotate(sum(p[0] for p in parts), sum(p[1] for p in parts), block * block_k, freq)
    return hi, lo, total, key[0], key[1]

  def unchanged():
    zeros = jnp.zeros((d,), jnp.float32)
    return zeros, zeros, zeros, jnp.zeros((half,), jnp.float32), jnp.zeros((half,), jnp.float32)

  hi, lo, total, new1, new2 = jax.lax.cond(owner, fold_and_project, unchanged)

  @pl.when(owner)
  def _():
    max_out[block, :] = hi
    min_out[block, :] = lo
    sum_out[block, :] = total
    key_out[block, pl.ds(0, half)] = new1
    key_out[block, pl.ds(half, half)] = new2

  blocks = start + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
  new_here = owner & (blocks == block)
  key1 = key_ref[pl.ds(start, chunk), pl.ds(0, half)]
  key2 = key_ref[pl.ds(start, chunk), pl.ds(half, half)]
  scale = (2 * half) ** -0.5
  for g in range(group):
    q1, q2 = rotate(*_project(q_ref[g, :].astype(jnp.float32),
                              lambda rows, g=g: wq_ref[g, rows, :], half), q_offset, freq)
    cached = jnp.sum(key1 * q1[None, :], axis=1) + jnp.sum(key2 * q2[None, :], axis=1)
    new = jnp.sum(new1 * q1) + jnp.sum(new2 * q2)
    logits_ref[g, :] = jnp.where(new_here, new, cached) * scale
  for g in range(group, logits_ref.shape[0]):
    logits_ref[g, :] = jnp.zeros((chunk,), jnp.float32)


def launch(rows: int, n_k: int) -> tuple[int, int]:
  """decode_logits' default (chunk, num_warps) for `rows` (batch x kv heads)
  rows of n_k blocks: chunks of 64 (or the largest power of two dividing
  n_k), doubled to at most 128 while they would make more than PROGRAMS
  programs, and 8 warps. Each program's chain of reductions (its group's
  projections, then its chunk's logits) sets the kernel's time more than the
  count does. On an H200 (gate_step_launch.py, the kernel alone, us; 4 kv
  heads): batch 8 x 512 blocks, 128x8 6.6, 64x8 7.1, 32x8 10.3; 1 x 512, 64x8
  5.9, 128x8 6.2; 8 x 256, 64x8 6.0, 128x8 7.4; 1 x 256, 64x8 5.8, 128x8 7.0;
  8 x 128, 64x8 6.0, 128x8 7.5."""
  chunk = min(64, n_k & -n_k)
  while chunk < min(128, n_k & -n_k) and rows * n_k // chunk > PROGRAMS:
    chunk *= 2
  return chunk, 8


def check_shapes(q, k, max_stat, gate_key, q_proj_t, k_proj_t):
  """A ValueError naming the first argument whose shape does not fit."""
  b, hkv, group, d = q.shape
  n_k, half = gate_key.shape[2], gate_key.shape[3] // 2
  want = dict(k=(b, hkv, d), max_stat=(b, n_k, hkv, d), gate_key=(b, hkv, n_k, 2 * half),
              q_proj_t=(hkv, group, 2 * half, d), k_proj_t=(hkv, 2 * half, 3 * d))
  got = dict(k=k.shape, max_stat=max_stat.shape, gate_key=gate_key.shape,
             q_proj_t=q_proj_t.shape, k_proj_t=k_proj_t.shape)
  for name, shape in want.items():
    if tuple(got[name]) != shape:
      raise ValueError(f'decode_logits: {name} has shape {got[name]}, want {shape} '
                       f'(q {q.shape}, gate_key {gate_key.shape})')
  for name, n in (('head_dim', d), ('gate_dim / 2', half)):
    if n & (n - 1):
      raise ValueError(f'decode_logits: {name} {n} must be a power of two (Triton blocks)')


@functools.partial(jax.jit, static_argnames=('block_k', 'chunk', 'num_warps', 'interpret'))
def decode_logits(q, k, stats, gate_key, q_proj_t, k_proj_t, q_offset, kv_len, freq, *,
                  block_k: int, chunk: int | None = None, num_warps: int | None = None,
                  interpret: bool = False):
  """One new token's gate logits, and the cache entries it changes.

  q [B, Hkv, G, D] and k [B, Hkv, D]: the token's pre-rotary query (its group's
  heads) and key, at q_offset [B] (kv_len [B]: a token at or past it is
  padding); stats: the cache's (max, min, sum) key statistics, f32 [B, nK,
  Hkv, D] each; gate_key f32 [B, Hkv, nK, gate_dim]; q_proj_t [Hkv, G,
  gate_dim, D] and k_proj_t [Hkv, gate_dim, 3D] the gate's projections,
  transposed (_project; the same at every step of a decode loop); freq
  [gate_dim / 2] the rotary inverse frequencies. Returns (logits f32 [B, Hkv,
  G', nK], stats, gate_key): the statistics and gate key of the token's block
  updated in place. D and gate_dim / 2 are powers of two; G is any (a group
  of 3 as it is): the kernel reads q and q_proj_t one head at a time, and
  writes the logits of G', G rounded up to a power of two (the rows past G
  zero: gate_select's block, whose padding heads count for nothing). chunk /
  num_warps None: launch's.
  """
  check_shapes(q, k, stats[0], gate_key, q_proj_t, k_proj_t)
  b, hkv, group, d = q.shape
  n_k, gate_dim = gate_key.shape[2:]
  auto_chunk, auto_warps = launch(b * hkv, n_k)
  chunk, num_warps = chunk or auto_chunk, num_warps or auto_warps
  if chunk & (chunk - 1) or n_k % chunk:
    raise ValueError(f'decode_logits: {chunk=} must be a power of two dividing {n_k=}')
  heads = pl.next_power_of_2(group)
  row = pl.BlockSpec((None,), lambda bi, h, c: (bi,))
  stat = pl.BlockSpec((None, n_k, None, d), lambda bi, h, c: (bi, 0, h, 0))
  key = pl.BlockSpec((None, None, n_k, gate_dim), lambda bi, h, c: (bi, h, 0, 0))
  logits, *updated = pl.pallas_call(
      functools.partial(_kernel, n_k=n_k, block_k=block_k, chunk=chunk),
      grid=(b, hkv, n_k // chunk),
      in_specs=[row, row, pl.BlockSpec((gate_dim // 2,), lambda bi, h, c: (0,)),
                pl.BlockSpec((None, None, group, d), lambda bi, h, c: (bi, h, 0, 0)),
                pl.BlockSpec((None, None, d), lambda bi, h, c: (bi, h, 0)),
                pl.BlockSpec((None, group, gate_dim, d), lambda bi, h, c: (h, 0, 0, 0)),
                pl.BlockSpec((None, gate_dim, 3 * d), lambda bi, h, c: (h, 0, 0)),
                stat, stat, stat, key],
      out_specs=[pl.BlockSpec((None, None, heads, chunk), lambda bi, h, c: (bi, h, 0, c)),
                 stat, stat, stat, key],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, heads, n_k), jnp.float32),
                 *(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in stats),
                 jax.ShapeDtypeStruct(gate_key.shape, jnp.float32)],
      input_output_aliases={7: 1, 8: 2, 9: 3, 10: 4},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
  )(jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_len, jnp.int32),
    jnp.asarray(freq, jnp.float32), q, k, q_proj_t, k_proj_t, *stats, gate_key)
  return logits, tuple(updated[:3]), updated[3]


def decode_logits_reference(q, k, stats, gate_key, q_proj_t, k_proj_t, q_offset, kv_len, freq,
                            *, block_k):
  """decode_logits in plain jnp, as the model's XLA path computes it (logits
  [B, Hkv, G, nK]: the group's heads only)."""
  b, _, _, d = q.shape
  n_k, half = gate_key.shape[2], gate_key.shape[3] // 2
  rows = jnp.arange(b)
  block = jnp.minimum(q_offset // block_k, n_k - 1)
  real = q_offset < kv_len
  k = k.astype(jnp.float32)
  old = [x[rows, block] for x in stats]    # [B, Hkv, D]
  hi, lo, total = jnp.maximum(old[0], k), jnp.minimum(old[1], k), old[2] + k
  new_stats = tuple(jnp.where(real[:, None, None], new, o) for new, o in
                    zip((hi, lo, total), old))
  stats = tuple(x.at[rows, block].set(new) for x, new in zip(stats, new_stats))
  count = jnp.clip(kv_len - block * block_k, 0, block_k)[:, None, None]
  pooled = jnp.concatenate([jnp.where(count > 0, new_stats[0], 0.0),
                            jnp.where(count > 0, new_stats[1], 0.0),
                            new_stats[2] / jnp.maximum(count, 1)], axis=-1)
  hp = jax.lax.Precision.HIGHEST
  key = jnp.einsum('bhe,hge->bhg', pooled, k_proj_t.astype(jnp.float32), precision=hp)
  col = lambda x: x[:, None, None]
  key = jnp.concatenate(rotate(key[..., :half], key[..., half:], col(block * block_k), freq),
                        axis=-1)
  gate_key = gate_key.at[rows, :, block].set(
      jnp.where(real[:, None, None], key, gate_key[rows, :, block]))
  gq = jnp.einsum('bhgd,hged->bhge', q.astype(jnp.float32), q_proj_t.astype(jnp.float32),
                  precision=hp)
  col = lambda x: x[:, None, None, None]
  gq = jnp.concatenate(rotate(gq[..., :half], gq[..., half:], col(q_offset), freq), axis=-1)
  logits = jnp.einsum('bhge,bhne->bhgn', gq, gate_key, precision=hp) * (2 * half) ** -0.5
  return logits, stats, gate_key
