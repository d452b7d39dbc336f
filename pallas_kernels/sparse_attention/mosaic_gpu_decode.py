"""Block-sparse decode attention for Hopper, through Pallas Mosaic GPU.

One new token a sequence against its KV cache, over the key blocks its GQA
group selected (kv_ids[:kv_count], block_k keys each). Flash-decoding: CTA
(split, kv head, batch) takes a contiguous slice of the row's list, as
decode.sparse_decode's splits do, and ends as a partial that
decode.merge_windows merges.

Decode is a stream of K/V bytes with a little arithmetic on each, and each
CTA streams its slice at the speed DRAM grants it, which varies from CTA to
CTA (benchmarks/cta_spread.py: at equal work the slowest of 128 took 1.34x
the fastest). So a CTA is one warpgroup, small (48 KB of shared memory and
128 registers a thread at one slot), and two share each SM: an SM idles only
once both are done, and one CTA's start overlaps the other's streaming. The
warpgroup issues the TMA loads of its blocks num_stages ahead and runs one
64-row wgmma tile's online softmax over them; K's slot is refilled once its
QK^T is done, V's once its PV is. The warp-specialized kernel this replaced
(a TMA warpgroup feeding two wgmma warpgroups through a 6-slot ring, 216 KB,
one CTA an SM, 128 CTAs) took 3-5% longer a chained step at batch 8 x 32k,
5-10% at 1 x 32k and 8 x 8k; its SMs were active 77-83% of its time, this
kernel's 89% (H200, docs/results.md). Over a 65% step's blocks it is within 4%
of a kernel that only loads them, and over every block it streams at cuDNN's
rate (benchmarks/stream_bound.py): what is left is each kernel's start and tail.

q is read where it lies: the tile's first W rows are an 8-row-aligned window
of q's heads holding the group's G (_q_windows), the rows below are never
written. A row's softmax and output read only that row, so those rows (and
the neighbouring groups' in the window) are computed and dropped.

With one token every visible key lies below min(kv_len, max(prefix_len,
q_offset + 1)), so that one bound masks every block exactly.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention import decode
from pallas_kernels.sparse_attention.block_tables import check_qkv
from pallas_kernels.sparse_attention.mosaic_gpu_backward import (
    _dot_t, _mma, _transforms, _zeros)

ROWS = 64             # the query tile: one wgmma M tile
LOG2E = math.log2(math.e)
M_INIT = -1e30        # finite: a block fully masked keeps alpha = 1, p = 0
SMEM_BYTES = 227 * 1024
# CTAs a call launches by default: about two an SM of an H100 or H200 (132
# SMs), up to four fitting at once. At batch 8 x 32k a chained step took 3%
# longer with 512 (one slot), 1% with 128 and 7% with 1024 (two slots; H200,
# docs/results.md).
CTAS = 256
# Profiler events a warpgroup may record (profile_dir): a range is two.
PROFILE_EVENTS = 16
# K/V slots a CTA by default: 48 KB of shared memory at block_k 64, head dim
# 128. With two a chained step took 3% longer at batch 8 x 32k, with three (112
# KB a CTA) 14% at 512 CTAs; prefetching the next blocks into L2 instead took
# 6-41% longer (H200, docs/results.md): more bytes in flight slow the stream.
STAGES = 1


@dataclasses.dataclass(frozen=True)
class _Static:
  block_k: int
  num_stages: int
  num_splits: int
  scale: float          # sm_scale * log2(e): logits in log2 units, for exp2
  dtype: jnp.dtype
  width: int            # kv_ids' row width
  window: int           # q rows a CTA loads: its group's and maybe neighbours' (_q_windows)
  per_window: int       # groups in a window
  interpret: plgpu.InterpretGPUParams | None


def _slice_of(count, split, splits):
  """(first entry, length) of split `split`'s contiguous slice of a list of
  `count` entries, the lengths floor or ceil(count / splits): with slices of
  ceil(count / splits) the last took the remainder, so more of the CTAs ran
  the longest slice (at 1 x 32k a chained step took 2-4% longer; H200,
  docs/results.md)."""
  lo = lax.div(split * count, splits)
  return lo, lax.div((split + 1) * count, splits) - lo


def _kernel(q_ref, k_ref, v_ref, ids_ref, count_ref, kv_len_ref, prefix_ref, offset_ref,
            out_ref, lse_ref, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, lse_smem, *,
            st: _Static):
  """CTA (split, head, batch): the online softmax of the query tile over its
  slice's n blocks, loads issued num_stages blocks ahead; partial `split`."""
  b, h, split = (lax.axis_index(a) for a in ("batch", "head", "split"))
  r = b * k_ref.shape[2] + h
  lo, n = _slice_of(count_ref[r], split, st.num_splits)
  row = r * st.width
  limit = jnp.minimum(kv_len_ref[b], jnp.maximum(prefix_ref[b], offset_ref[b] + 1))
  plgpu.copy_gmem_to_smem(q_ref.at[b, lax.div(h, st.per_window)],
                          q_smem.at[pl.ds(0, st.window)], q_bar)

  def fetch(ref, smem, bars, j, slot):
    """Block j of the slice (if any) into `slot` of ref's ring."""
    @pl.when(j < n)
    def _():
      keys = (b, pl.ds(ids_ref[row + lo + j] * st.block_k, st.block_k), h)
      plgpu.copy_gmem_to_smem(ref.at[keys], smem.at[slot], bars.at[slot])

  for i in range(st.num_stages):
    fetch(k_ref, k_smem, k_bar, i, i)
    fetch(v_ref, v_smem, v_bar, i, i)
  shape = (ROWS, st.block_k)
  plgpu.barrier_wait(q_bar)

  def step(j, carry):
    acc, m_i, l_i = carry
    slot = lax.rem(j, st.num_stages)
    kb = ids_ref[row + lo + j]
    plgpu.barrier_wait(k_bar.at[slot])
    qk = _dot_t(q_smem, k_smem.at[slot], *shape)
    fetch(k_ref, k_smem, k_bar, j + st.num_stages, slot)   # its QK^T has read it
    k_pos = kb * st.block_k + plgpu.broadcasted_iota(
        jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    qk = jnp.where(k_pos < limit, qk, -jnp.inf)
    m_new = jnp.maximum(m_i, qk.max(axis=1) * st.scale)
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(qk * st.scale - lax.broadcast_in_dim(m_new, shape, [0]))
    acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
    l_i = l_i * alpha + p.sum(axis=1)
    plgpu.barrier_wait(v_bar.at[slot])
    acc = _mma(acc, p.astype(st.dtype), v_smem.at[slot], st.interpret is not None)
    fetch(v_ref, v_smem, v_bar, j + st.num_stages, slot)
    return acc, m_new, l_i

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  init = (_zeros((ROWS, q_smem.shape[-1])),
          plgpu.layout_cast(jnp.full((ROWS,), M_INIT, jnp.float32), row_layout),
          plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), row_layout))
  with jax.named_scope('blocks'):   # a range of the Mosaic GPU profiler (profile_dir)
    acc, m_i, l_i = lax.fori_loop(0, n, step, init)

  # The output goes out through the query tile, which the last QK^T has read.
  # Only the window's rows go out; the rows below it never held a query.
  acc *= lax.broadcast_in_dim(1.0 / jnp.maximum(l_i, 1.0), acc.shape, [0])
  q_smem[...] = acc.astype(st.dtype)
  lse_smem[...] = (m_i + jnp.log2(l_i)) * (1.0 / LOG2E)   # -inf: no key seen
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, st.window)], out_ref.at[b, h, split])
  plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, st.window)], lse_ref.at[b, h, split])
  plgpu.wait_smem_to_gmem(0)


def default_splits(rows, width, ctas=CTAS):
  """Slices a list is cut into: about `ctas` CTAs in all, at most `width` (the
  list's), a power of two (so decode.merge_windows takes the partials)."""
  return 1 << max(0, min(ctas // rows, width).bit_length() - 1)


def _q_windows(q, hkv):
  """q [B, 1, Hq, D] as [B, windows, W, D] with each kv head's G query rows in
  window h // per_window at row (h % per_window) * G, W a multiple of 8 (a
  TMA box of whole 8-row tiles): (rows, W, per_window). A reshape, no copy,
  where G divides 8 (W = 8, a window holding 8 / G groups) or 8 divides G;
  else each group padded to W rows (one small XLA kernel)."""
  b, _, hq, d = q.shape
  group = hq // hkv
  if group % 8 == 0:
    return q.reshape(b, hkv, group, d), group, 1
  if 8 % group == 0 and hkv % (8 // group) == 0:
    return q.reshape(b, hkv * group // 8, 8, d), 8, 8 // group
  window = -(-group // 8) * 8
  rows = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, window - group), (0, 0)))
  return rows, window, 1


def _own_rows(x, group, per_window):
  """[B, Hkv, P, W, ...] per-window partials -> [B, Hkv, P, G, ...]: head h's
  rows (h % per_window) * G + [0, G)."""
  b, hkv = x.shape[:2]
  x = x.reshape(b, hkv // per_window, per_window, *x.shape[2:])
  own = [x[:, :, j, :, j * group:(j + 1) * group] for j in range(per_window)]
  return jnp.stack(own, axis=2).reshape(b, hkv, *own[0].shape[2:])


def _smem_bytes(block_k, head_dim, num_stages, itemsize):
  return (ROWS + 2 * num_stages * block_k) * head_dim * itemsize


def check_config(block_k, head_dim, num_stages, itemsize=2):
  """Raises ValueError naming the option that does not fit."""
  if block_k not in (64, 128):
    raise ValueError(f"mosaic sparse_decode: block_k={block_k} must be 64 or 128")
  if head_dim % 64 or head_dim > 128:
    raise ValueError(f"mosaic sparse_decode: head_dim={head_dim} must be 64 or 128")
  if num_stages < 1:
    raise ValueError(f"mosaic sparse_decode: num_stages={num_stages} must be >= 1")
  smem = _smem_bytes(block_k, head_dim, num_stages, itemsize)
  if smem > SMEM_BYTES:
    raise ValueError(f"mosaic sparse_decode: num_stages={num_stages} needs {smem} bytes "
                     f"of shared memory at block_k={block_k}, head_dim={head_dim}; "
                     f"there are {SMEM_BYTES}")


def unsupported(q, k_cache, block_k, num_stages=None) -> str | None:
  """Why this kernel cannot take these shapes (None: it can); num_stages
  None: STAGES."""
  _, m, hq, d = q.shape
  if m != 1:
    return f"mosaic sparse_decode takes one new token per row; got q {q.shape}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"mosaic sparse_decode wants bf16/f16 q, k, v; got {q.dtype}"
  if hq // k_cache.shape[2] > ROWS:
    return f"mosaic sparse_decode: {hq // k_cache.shape[2]} query heads per kv head; at most {ROWS}"
  if k_cache.shape[1] % block_k:
    return (f"mosaic sparse_decode: cache length {k_cache.shape[1]} must be a multiple of "
            f"{block_k=}")
  try:
    check_config(block_k, d, num_stages or STAGES, q.dtype.itemsize)
  except ValueError as e:
    return str(e)
  return None


@functools.partial(jax.jit, static_argnames=(
    "block_k", "num_splits", "num_stages", "sm_scale", "interpret", "profile_dir"))
def sparse_decode(q, k_cache, v_cache, kv_ids, kv_count, kv_len, prefix_len, q_offset, *,
                  block_k: int, num_splits: int = 0, num_stages: int | None = None,
                  sm_scale: float | None = None, interpret: bool = False,
                  profile_dir: str | None = None):
  """Decode attention over the selected cache blocks, one new token a row.

  q [B, 1, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; kv_ids [B, Hkv, max_k]
  ascending or not, kv_count [B, Hkv]; kv_len, prefix_len, q_offset int [B]
  (decode.sparse_decode's arguments). Returns [B, 1, Hq, D] in q.dtype; a row
  with no visible key outputs 0. num_splits: slices a list is cut into (0:
  about CTAS CTAs in all, a power of two); num_stages: K/V slots a CTA (None:
  STAGES). profile_dir: a GPU run records each CTA's `blocks` range
  (its loop) with its SM and clock (Mosaic GPU's profiler) and writes a trace
  there, once a compiled kernel (benchmarks/cta_spread.py).
  """
  b, _, hq, d = q.shape
  hkv = k_cache.shape[2]
  group = hq // hkv
  check_qkv(q, k_cache, v_cache)
  if reason := unsupported(q, k_cache, block_k, num_stages):
    raise ValueError(reason)
  if kv_ids.ndim != 3 or kv_ids.shape[:2] != (b, hkv) or kv_count.shape != (b, hkv):
    raise ValueError(f"mosaic sparse_decode: {kv_ids.shape=} / {kv_count.shape=} must be "
                     f"(B, Hkv, max_k) / (B, Hkv) with (B, Hkv)={(b, hkv)}")
  num_splits = num_splits or default_splits(b * hkv, kv_ids.shape[-1])
  num_stages = num_stages or STAGES
  q_rows, window, per_window = _q_windows(q, hkv)
  st = _Static(block_k=block_k, num_stages=num_stages, num_splits=num_splits,
               scale=(d ** -0.5 if sm_scale is None else sm_scale) * LOG2E, dtype=q.dtype,
               width=kv_ids.shape[-1], window=window, per_window=per_window,
               interpret=plgpu.InterpretGPUParams() if interpret else None)
  transforms = _transforms(q.dtype)
  ring = lambda: plgpu.SMEM((num_stages, block_k, d), q.dtype, transforms=transforms)
  scratch = (plgpu.SMEM((ROWS, d), q.dtype, transforms=transforms), ring(), ring(),
             plgpu.Barrier(), plgpu.Barrier(num_barriers=num_stages),
             plgpu.Barrier(num_barriers=num_stages), plgpu.SMEM((ROWS,), jnp.float32))
  out, lse = plgpu.kernel(
      functools.partial(_kernel, st=st),
      out_type=(jax.ShapeDtypeStruct((b, hkv, num_splits, window, d), q.dtype),
                jax.ShapeDtypeStruct((b, hkv, num_splits, window), jnp.float32)),
      scratch_types=scratch,
      grid=(num_splits, hkv, b),
      grid_names=("split", "head", "batch"),
      compiler_params=plgpu.CompilerParams(
          approx_math=True, profile_space=PROFILE_EVENTS if profile_dir else 0,
          profile_dir=profile_dir or ""),
      interpret=st.interpret,
  )(q_rows, k_cache, v_cache, kv_ids.astype(jnp.int32).reshape(-1),
    kv_count.astype(jnp.int32).reshape(-1),
    *(jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b,)) for x in (kv_len, prefix_len, q_offset)))
  # Merge only the G rows of each head's own group.
  if decode.mergeable(num_splits, window, group, d):
    merged = decode.merge_windows(out, lse, group=group, per_window=per_window,
                                  dtype=q.dtype, interpret=interpret)
  else:
    out, lse = (_own_rows(x, group, per_window) for x in (out, lse[..., None]))
    merged = decode.combine(out.astype(jnp.float32), lse[..., 0], axis=2)
  return merged.reshape(b, 1, hq, d).astype(q.dtype)
