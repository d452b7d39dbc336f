"""Block-sparse flash attention for TPU (Pallas Mosaic-TPU), splash style.

The block tables (block_tables.py) drive the grid through scalar prefetch:
they are copied to SMEM before the kernel starts, and the K/V index_maps read
them, so the pipeline DMAs only the listed key blocks.

Forward and dq: grid (B, Hq, nQ, max_k); step j visits key block
kv_ids[b, h // G, i, j]. The tables pad a row by repeating its last id, so the
steps past kv_count ask for the block already in VMEM and Pallas skips the
copy; `pl.when(j < kv_count)` skips their compute. Online softmax in f32 VMEM
scratch, initialised at j == 0 and written out at the last j.

dk/dv: grid (B, Hkv, nK, G * max_q); step t visits query head h_kv * G + t //
max_q and query block q_ids[b, h_kv, kb, t % max_q], so the G query heads of a
group accumulate into one dk/dv scratch and dk/dv come out per kv head.

Inside a visited tile, key j is visible to query i iff j < kv_len[b] and
(j < prefix_len[b] or j <= i); rows with no visible key output 0 (reference.py).

TPU layout rules, checked in _check_shapes: a block's last two dims must be
divisible by (8, 128) or equal the array's. Heads are moved in front of the
sequence ([B, H, T, D]) so a block is (block_q or block_k, D): D is the full
last dim (use 128 or a multiple for the MXU), block_q and block_k must be
multiples of 8 (128 or more for real speed). Row statistics (m, l, lse, di) are
kept lane-replicated as [.., 128] f32, as in JAX's TPU flash attention.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention.block_tables import (
    BlockSizes, BlockTables, check_block_multiples, check_qkv, with_q_tables)

LANES = 128     # a TPU vreg is 8 sublanes x 128 lanes
SUBLANES = 8
# Finite, so (mask - mask) is 0 rather than NaN when a row has seen no key yet.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))   # dot_general numbers for a @ b.T
# The last grid axis walks a table row into one scratch accumulator.
COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=(
    "parallel", "parallel", "parallel", "arbitrary"))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels need that is known at trace time."""
  block_q: int
  block_k: int
  group: int          # query heads per kv head
  scale: float
  interpret: object   # False, True or pltpu.InterpretParams()


def _row(b, h_kv, blk, n_heads, n_blocks):
  """Flat index of table row [b, h_kv, blk]. The tables go to SMEM flat, as
  JAX's TPU paged attention passes its page table: no tiling padding of the
  minor dims of a 4-D array in the small SMEM."""
  return (b * n_heads + h_kv) * n_blocks + blk


def _visible(q_block, k_block, kv_len, prefix_len, bq, bk):
  """[bq, bk] element mask of one tile: kv_len cut, causal, bidirectional prefix."""
  q_pos = q_block * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_pos = k_block * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return (k_pos < kv_len) & ((k_pos < prefix_len) | (k_pos <= q_pos))


def _probs(q, k, lse, visible, scale):
  """Backward: softmax probabilities of a tile, rebuilt from the saved lse."""
  s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
  return jnp.where(visible, jnp.exp(s - lse[:, :1]), 0.0)


def _query_major_specs(st: _Static, d, n_heads, n_blocks, width):
  """BlockSpecs of a (B, Hq, nQ, max_k) grid: (q-like [bq, D], row statistic
  [bq, 128], k/v [bk, D] at the listed key block)."""
  def kv_map(b, h, i, j, ids, *_):
    row = _row(b, h // st.group, i, n_heads, n_blocks)
    return b, h // st.group, ids[row * width + j], 0

  q_map = lambda b, h, i, j, *_: (b, h, i, 0)
  return (pl.BlockSpec((None, None, st.block_q, d), q_map),
          pl.BlockSpec((None, None, st.block_q, LANES), q_map),
          pl.BlockSpec((None, None, st.block_k, d), kv_map))


# ---------------------------------------------------------------- forward ----

def _fwd_kernel(ids_ref, count_ref, kv_len_ref, prefix_ref,   # SMEM tables
                q_ref, k_ref, v_ref,                           # VMEM tiles
                o_ref, lse_ref,                                # outputs
                m_ref, l_ref, acc_ref,                         # f32 scratch
                *, st: _Static, n_heads: int, n_blocks: int, width: int):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = _row(b, h // st.group, i, n_heads, n_blocks)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(j < count_ref[row])
  def _visit():
    visible = _visible(i, ids_ref[row * width + j], kv_len_ref[b],
                       prefix_ref[b], st.block_q, st.block_k)
    s = lax.dot_general(q_ref[...], k_ref[...], NT,
                        preferred_element_type=jnp.float32) * st.scale
    s = jnp.where(visible, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    # Zero masked probabilities explicitly: in a row with no visible key so far
    # s - m_next is 0, and exp would count masked keys as weight 1.
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + jnp.dot(
        p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)

  @pl.when(j == width - 1)
  def _finish():
    l = l_ref[...]
    seen = l > 0.0               # false iff the row has no visible key
    l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_ref[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l), 0.0)


def _forward(q, k, v, tables, kv_len, prefix_len, st: _Static):
  """Head-major q [B, Hq, T, D], k/v [B, Hkv, S, D] -> (o, lse [B, Hq, T])."""
  b, hq, t, d = q.shape
  hkv, bq = k.shape[1], st.block_q
  n_q, width = t // bq, tables.kv_ids.shape[-1]
  q_spec, lse_spec, kv_spec = _query_major_specs(st, d, hkv, n_q, width)
  kernel = functools.partial(_fwd_kernel, st=st, n_heads=hkv, n_blocks=n_q,
                             width=width)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, hq, n_q, width),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=[q_spec, lse_spec],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, t, LANES), jnp.float32)],
      compiler_params=COMPILER_PARAMS,
      interpret=st.interpret,
      name="sparse_attention_tpu_fwd",
  )(*_scalars(tables.kv_ids, tables.kv_count, kv_len, prefix_len), q, k, v)
  return o, lse[..., 0]


def _scalars(ids, count, kv_len, prefix_len):
  """The four scalar-prefetch operands: flat int32 tables, then [B] lengths."""
  return (ids.astype(jnp.int32).reshape(-1), count.astype(jnp.int32).reshape(-1),
          jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32))


def _lanes(x):
  """[B, H, T] f32 -> [B, H, T, 128]: a row statistic as the kernels read it."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES)).astype(jnp.float32)


# ------------------------------------------------------------------- dq ----

def _dq_kernel(ids_ref, count_ref, kv_len_ref, prefix_ref,
               q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               dq_ref, acc_ref, *, st: _Static, n_heads: int, n_blocks: int,
               width: int):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = _row(b, h // st.group, i, n_heads, n_blocks)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(j < count_ref[row])
  def _visit():
    visible = _visible(i, ids_ref[row * width + j], kv_len_ref[b],
                       prefix_ref[b], st.block_q, st.block_k)
    k = k_ref[...]
    p = _probs(q_ref[...], k, lse_ref[...], visible, st.scale)
    dp = lax.dot_general(do_ref[...], v_ref[...], NT,
                         preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[...][:, :1])
    acc_ref[...] += jnp.dot(ds.astype(k.dtype), k,
                            preferred_element_type=jnp.float32)

  @pl.when(j == width - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * st.scale).astype(dq_ref.dtype)


def _dq(q, k, v, do, lse, di, tables, kv_len, prefix_len, st: _Static):
  b, hq, t, d = q.shape
  hkv, bq = k.shape[1], st.block_q
  n_q, width = t // bq, tables.kv_ids.shape[-1]
  q_spec, row_spec, kv_spec = _query_major_specs(st, d, hkv, n_q, width)
  kernel = functools.partial(_dq_kernel, st=st, n_heads=hkv, n_blocks=n_q,
                             width=width)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, hq, n_q, width),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=COMPILER_PARAMS,
      interpret=st.interpret,
      name="sparse_attention_tpu_dq",
  )(*_scalars(tables.kv_ids, tables.kv_count, kv_len, prefix_len),
    q, k, v, do, _lanes(lse), _lanes(di))


# ---------------------------------------------------------------- dk, dv ----

def _dkv_kernel(ids_ref, count_ref, kv_len_ref, prefix_ref,
                q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, dk_acc, dv_acc,
                *, st: _Static, n_heads: int, n_blocks: int, width: int):
  b, h_kv, kb, t = (pl.program_id(a) for a in range(4))
  row = _row(b, h_kv, kb, n_heads, n_blocks)
  slot = t % width                 # t runs over (group member, table slot)

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  @pl.when(slot < count_ref[row])
  def _visit():
    visible = _visible(ids_ref[row * width + slot], kb, kv_len_ref[b],
                       prefix_ref[b], st.block_q, st.block_k)
    q, do = q_ref[...], do_ref[...]
    p = _probs(q, k_ref[...], lse_ref[...], visible, st.scale)   # [bq, bk]
    dv_acc[...] += jnp.dot(p.T.astype(do.dtype), do,
                           preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[...][:, :1])
    dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q,
                           preferred_element_type=jnp.float32)

  @pl.when(t == st.group * width - 1)
  def _finish():
    dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv(q, k, v, do, lse, di, tables, kv_len, prefix_len, st: _Static):
  b, hq, _, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  bq, bk = st.block_q, st.block_k
  n_k, width = s // bk, tables.q_ids.shape[-1]

  def q_map(bi, h_kv, kb, t, ids, *_):
    q_block = ids[_row(bi, h_kv, kb, hkv, n_k) * width + t % width]
    return bi, h_kv * st.group + t // width, q_block, 0

  q_spec = pl.BlockSpec((None, None, bq, d), q_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, h, kb, t, *_: (bi, h, kb, 0))
  kernel = functools.partial(_dkv_kernel, st=st, n_heads=hkv, n_blocks=n_k,
                             width=width)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, hkv, n_k, st.group * width),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32),
                          pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=COMPILER_PARAMS,
      interpret=st.interpret,
      name="sparse_attention_tpu_dkv",
  )(*_scalars(tables.q_ids, tables.q_count, kv_len, prefix_len),
    q, k, v, do, _lanes(lse), _lanes(di))


# ------------------------------------------------------------ custom_vjp ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, tables, kv_len, prefix_len, st):
  return _forward(q, k, v, tables, kv_len, prefix_len, st)[0]


def _attend_fwd(q, k, v, tables, kv_len, prefix_len, st):
  o, lse = _forward(q, k, v, tables, kv_len, prefix_len, st)
  return o, (q, k, v, tables, kv_len, prefix_len, o, lse)


def _attend_bwd(st, res, do):
  q, k, v, tables, kv_len, prefix_len, o, lse = res
  tables = with_q_tables(tables, k.shape[2] // st.block_k)  # kv-only tables
  # di = rowsum(dO * O) = rowsum(P * dP): the softmax Jacobian's diagonal term.
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  args = (q, k, v, do, lse, di, tables, kv_len, prefix_len, st)
  dk, dv = _dkv(*args)
  return _dq(*args), dk, dv, None, None, None     # tables, lengths: integers


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------- public ----

def _check_shapes(q, k, v, tables: BlockTables, block_sizes: BlockSizes):
  b, t = q.shape[:2]
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  check_qkv(q, k, v)
  check_block_multiples(q, k, block_sizes)
  # Mosaic block rule: the second-minor block dim divisible by 8 or whole.
  for name, blk, full in (("block_q", bq, t), ("block_k", bk, s)):
    if blk % SUBLANES and blk != full:
      raise ValueError(f"TPU {name}={blk} must be a multiple of {SUBLANES} "
                       f"or the whole sequence ({full})")
  want_q, want_k = (b, hkv, t // bq), (b, hkv, s // bk)
  if tables.kv_ids.shape[:3] != want_q or tables.kv_count.shape != want_q:
    raise ValueError(f"{tables.kv_ids.shape=} / {tables.kv_count.shape=} must "
                     f"start with (B, Hkv, nQ)={want_q}")
  if tables.q_ids is not None and (tables.q_ids.shape[:3] != want_k
                                   or tables.q_count.shape != want_k):
    raise ValueError(f"{tables.q_ids.shape=} / {tables.q_count.shape=} must "
                     f"start with (B, Hkv, nK)={want_k}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "interpret"))
def sparse_attention(q, k, v, tables: BlockTables, kv_len, prefix_len, *,
                     block_sizes: BlockSizes, sm_scale: float | None = None,
                     interpret=False) -> jax.Array:
  """Block-sparse attention on TPU, differentiable in q, k, v.

  q [B, T, Hq, D]; k, v [B, S, Hkv, D]; tables from build_block_tables on a
  [B, Hkv, T/block_q, S/block_k] block mask (kv_* drive forward and dq, q_*
  drive dk/dv; q_ids None: built from kv_* in the backward); kv_len, prefix_len int [B]. Returns [B, T, Hq, D] in q.dtype,
  with reference.py's semantics. interpret: False (compile for TPU), True or a
  pltpu.InterpretParams (run on CPU; the latter emulates the TPU memory model).
  """
  _check_shapes(q, k, v, tables, block_sizes)
  st = _Static(block_q=block_sizes.block_q, block_k=block_sizes.block_k,
               group=q.shape[2] // k.shape[2],
               scale=q.shape[-1] ** -0.5 if sm_scale is None else sm_scale,
               interpret=interpret)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)   # [B, L, H, D] <-> [B, H, L, D]
  o = _attend(heads_major(q), heads_major(k), heads_major(v), tables,
              jnp.asarray(kv_len, jnp.int32), jnp.asarray(prefix_len, jnp.int32), st)
  return heads_major(o)
