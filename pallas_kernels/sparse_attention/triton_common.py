"""Pieces every Pallas-Triton sparse-attention kernel shares: the element mask,
f32-accumulating dots, table padding, shape checks, compiler params and the
online-softmax loops (one block a step; n blocks a step for decode).

Lowering rules these follow (measured on an H100 with jax 0.11.2): every
array a kernel touches has a power-of-two size, dots have >= 16 rows, and dots
go through lax.dot_general with an f32 preferred type (pl.dot is gone).
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite, so (mask - mask) is 0 rather than NaN when a row has seen no key yet.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible(q_pos, k_pos, kv_len, prefix_len):
  """Key k_pos visible to query q_pos (broadcasting; pass [R,1] x [1,C] or the
  transpose): causal with a bidirectional prefix, cut at kv_len."""
  return (k_pos < kv_len) & ((k_pos < prefix_len) | (k_pos <= q_pos))


def dot(a, b, *, trans_b=False):
  """a @ b (or a @ b.T) accumulated in f32; the operands share a dtype."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def pad_ids(ids):
  """Widen the last axis of a block-id table to a power of two by repeating its
  last id: loops never read past their count, so the values do not matter,
  but every Triton block must have a power-of-two size."""
  width = pl.next_power_of_2(ids.shape[-1])
  pad = ((0, 0),) * (ids.ndim - 1) + ((0, width - ids.shape[-1]),)
  return jnp.pad(ids.astype(jnp.int32), pad, mode='edge')


def check_pow2(**sizes):
  """Triton tiles must be powers of two, and its dots need >= 16 rows."""
  for name, n in sizes.items():
    if n < 16 or n & (n - 1):
      raise ValueError(f'{name}={n} must be a power of two >= 16')


def compiler_params(head_dim, num_warps, num_stages):
  if num_warps is None:
    num_warps = 4 if head_dim <= 64 else 8
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def query_tile_specs(q, k, block_q, ids_width):
  """BlockSpecs of the grid (B, Hq, T / block_q), one query tile per program,
  shared by the forward and dq kernels: (its q tile [bq, D], its kv head's
  K/V [S, D], its kv_ids row [ids_width], its kv_count, its rows [bq] of a
  [B, Hq, T] array such as the lse)."""
  d, s = q.shape[3], k.shape[1]
  group = q.shape[2] // k.shape[2]
  return (pl.BlockSpec((None, block_q, None, d), lambda bi, h, i: (bi, i, h, 0)),
          pl.BlockSpec((None, s, None, d), lambda bi, h, i: (bi, 0, h // group, 0)),
          pl.BlockSpec((None, None, None, ids_width), lambda bi, h, i: (bi, h // group, i, 0)),
          pl.BlockSpec((None, None, None), lambda bi, h, i: (bi, h // group, i)),
          pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i)))


def batch_scalar_spec():
  """BlockSpec of a [B] vector (kv_len, prefix_len, ...) read as one scalar per
  program; grid axis 0 is the batch in every kernel here."""
  return pl.BlockSpec((None,), lambda bi, *_: (bi,))


def softmax_start(rows, head_dim):
  """Online-softmax state (acc [R, D], row max [R], row sum [R]) before any key."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def attend_block(q, k_ref, v_ref, start, state, q_pos, kv_len, prefix_len, *,
                 sm_scale, block_k):
  """One online-softmax step of q [R, D] over the keys [start, start + block_k)."""
  k = k_ref[pl.ds(start, block_k), :]
  v = v_ref[pl.ds(start, block_k), :]
  return softmax_update(q, [k], [v], [start], state, q_pos, [kv_len], prefix_len,
                        sm_scale=sm_scale)


def softmax_update(q, ks, vs, starts, state, q_pos, kv_lens, prefix_len, *,
                   sm_scale):
  """One online-softmax step of q [R, D] over n loaded blocks: keys ks[t],
  vs[t] [block_k, D] at positions [starts[t], starts[t] + block_k), cut at
  kv_lens[t]. One row max, one correction and one row sum for all n, so a
  step costs two cross-warp reductions whatever n is (Triton cannot
  concatenate the [R, block_k] logits; elementwise max / sum over the blocks
  does the same). A block with kv_len 0 sees no key: it changes nothing, bit
  for bit (p 0; its logits never raise the max). n = 1 emits the ops of a
  one-block step, no extra add or max."""
  acc, row_max, row_sum = state
  add = lambda xs: functools.reduce(jnp.add, xs)
  seen = [visible(q_pos[:, None], start + jnp.arange(k.shape[0])[None, :],
                  kv_len, prefix_len) for k, start, kv_len in zip(ks, starts, kv_lens)]
  logits = [jnp.where(s, dot(q, k, trans_b=True) * sm_scale, MASK_VALUE)
            for s, k in zip(seen, ks)]
  new_max = jnp.maximum(row_max, jnp.max(functools.reduce(jnp.maximum, logits), axis=-1))
  correction = jnp.exp(row_max - new_max)
  # Zero masked probabilities explicitly: in a row with no visible key so far
  # logits - new_max is 0, and exp would count masked keys as weight 1.
  p = [jnp.where(s, jnp.exp(x - new_max[:, None]), 0.0) for s, x in zip(seen, logits)]
  row_sum = correction * row_sum + jnp.sum(add(p), axis=-1)
  acc = correction[:, None] * acc + add([dot(pt.astype(v.dtype), v) for pt, v in zip(p, vs)])
  return acc, new_max, row_sum


def softmax_finish(state):
  """The normalised output [R, D] f32 and the row logsumexp [R] f32; a row that
  saw no visible key gets output 0 and lse -inf."""
  acc, row_max, row_sum = state
  seen_any = row_sum > 0
  out = acc / jnp.where(seen_any, row_sum, 1.0)[:, None]
  lse = jnp.where(seen_any, row_max + jnp.log(jnp.where(seen_any, row_sum, 1.0)),
                  -jnp.inf)
  return out, lse


def attend_blocks(q, k_ref, v_ref, ids_ref, lo, hi, q_pos, kv_len, prefix_len,
                  *, sm_scale, block_k):
  """Online softmax (f32) of q [R, D] over the key blocks ids_ref[lo:hi].

  k_ref, v_ref [S, D]; q_pos [R] absolute query positions. Returns
  softmax_finish's (output [R, D], lse [R]).
  """
  def visit(j, state):
    start = pl.multiple_of(ids_ref[j] * block_k, block_k)
    return attend_block(q, k_ref, v_ref, start, state, q_pos, kv_len, prefix_len,
                        sm_scale=sm_scale, block_k=block_k)

  state = lax.fori_loop(lo, hi, visit, softmax_start(*q.shape))
  return softmax_finish(state)


PREFETCH = (0, 1, 2)


def attend_block_groups(q, k_ref, v_ref, group, cursor, steps, q_pos, kv_len,
                        prefix_len, *, sm_scale, block_k, prefetch):
  """Online softmax (f32) of q [R, D] over `steps` groups of n key blocks.

  group(cursor) -> (next cursor, (starts, n_live)): the n block starts of one
  group, of which the first n_live are live. A dead slot should start at a
  block the row reads anyway (a cache hit, not DRAM bytes); it sees no key,
  so count % n tails change nothing. Each step issues all 2n K/V loads, then
  one softmax_update over the n blocks.

  prefetch: how far ahead of its dots a group is prepared, so that its loads
  wait on nothing its own step computes. 0: its starts are found in its own
  step (the loads wait on the id reads / block search). 1: found during the
  previous step (its loads issue first thing). 2: its tiles are also loaded
  during the previous step and carried in registers: a double buffer that
  does not rely on Triton's pipeliner (which leaves these loop-carried loads
  alone; use num_stages 1), at the price of registers (n = 4 spills).
  Returns softmax_finish's (output [R, D], lse [R]).
  """
  def load(addr):
    starts = addr[0]
    ks = [k_ref[pl.ds(s, block_k), :] for s in starts]
    return ks, [v_ref[pl.ds(s, block_k), :] for s in starts]

  def update(state, tiles, addr):
    starts, n_live = addr
    kv_lens = [jnp.where(t < n_live, kv_len, 0) for t in range(len(starts))]
    return softmax_update(q, *tiles, starts, state, q_pos, kv_lens, prefix_len,
                          sm_scale=sm_scale)

  def step0(_, carry):
    cursor, state = carry
    cursor, addr = group(cursor)
    return cursor, update(state, load(addr), addr)

  def step1(_, carry):
    cursor, addr, state = carry
    tiles = load(addr)
    cursor, following = group(cursor)
    return cursor, following, update(state, tiles, addr)

  def step2(_, carry):
    cursor, following, addr, tiles, state = carry
    following_tiles = load(following)
    cursor, after = group(cursor)
    return cursor, after, following, following_tiles, update(state, tiles, addr)

  state = softmax_start(*q.shape)
  if prefetch == 0:
    carry = lax.fori_loop(0, steps, step0, (cursor, state))
  elif prefetch == 1:
    carry = lax.fori_loop(0, steps, step1, (*group(cursor), state))
  else:
    cursor, addr = group(cursor)
    tiles = load(addr)
    carry = lax.fori_loop(0, steps, step2, (*group(cursor), addr, tiles, state))
  return softmax_finish(carry[-1])
