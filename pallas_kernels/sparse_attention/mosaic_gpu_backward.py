"""Block-sparse attention backward for Hopper, through Pallas Mosaic GPU.

Two kernels in the FA3 pattern (JAX's attention_mgpu.py `_attention_bwd`),
each with two compute warpgroups and a memory warpgroup that streams only the
listed blocks with TMA into a ring of shared-memory slots. Both recompute
p = exp2(s - lse) from the forward's row logsumexp; neither accumulates across
CTAs.

  dq:    one CTA per (query head, query tile of 2 x 64 rows, batch), like the
         forward. Each compute warpgroup keeps its 64 rows of q and dO in
         shared memory, first computes their delta = rowsum(dO * O) and lse in
         log2 units (and stores both for dk/dv, which runs after it) where
         O's rows fit beside them (block_k 64; else XLA computes both), then,
         per listed key block (kv_ids[:kv_count]), computes s = q k^T,
         dp = dO v^T, ds = p (dp - delta) and dq += ds k.
  dk/dv: one CTA per (kv head, key block, batch). The memory warpgroup streams,
         per listed query tile (q_ids[:q_count]) and per query head of the GQA
         group, that head's 128 rows of q, dO, lse and delta. The compute
         warpgroups work on transposed 64 x 64 tiles (keys x queries):
         sT = k q^T, dv += pT dO, dpT = v dO^T, dk += dsT q, in registers.
         block_k 128: warpgroup w owns keys [64w, 64w + 64) and takes both
         64-row halves of each query tile. block_k 64: both own the 64 keys,
         warpgroup w takes query half w, and warpgroup 1 hands its partial
         dk, dv to warpgroup 0 through shared memory at the end.

Tiles the element mask leaves fully visible (every key < kv_len and in the
prefix or <= the warpgroup's first query) skip the mask arithmetic: they are
a prefix of each ascending kv list and a suffix of each ascending q list, and
each warpgroup finds where its run ends as it goes (block_tables.split_loop).
Tables that come without the transposed q lists (the selection's) get them
from select_triton.q_tables, one kernel.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention import select_triton
from pallas_kernels.sparse_attention.block_tables import (
    BlockSizes, BlockTables, check_kv_tables, check_qkv, kernel_lengths, split_loop,
    top_k_rank, whole_below)

WG_ROWS = 64          # rows per compute warpgroup: one wgmma M tile
COMPUTE_WGS = 2
TILE_Q = WG_ROWS * COMPUTE_WGS   # the tables' block_q, as in the forward
LOG2E = math.log2(math.e)
# Registers a thread of each compute and of the memory warpgroup, here and in
# the forward: FA3's split for two consumer warpgroups (240 + 240 + 24 of the
# 512 an SM has per thread slot of a warpgroup). Against 232 / 40, on an H200
# (docs/results.md): the dk/dv kernel spills half as much, the 65% fwd + bwd
# step is 1.3-2.5% faster, the persistent forward kernel 1.3-3% faster, same
# bits.
COMPUTE_REGS, MEMORY_REGS = 240, 24


@dataclasses.dataclass(frozen=True)
class Config:
  """Shared-memory ring slots (>= 2) of each kernel. At head_dim 128 (227 KiB
  of shared memory) dk/dv takes at most 2 (64 KiB a slot); dq 2 at block_k
  128, 5 at 64, and up to 3 at 64 leave room for the O rows that let dq
  compute delta itself (_dq_has_room_for_o). dkv_order: the launch order of
  the dk/dv CTAs (_dkv_launch_order); longest_first measured best overall,
  blocks_ascending at 4k (docs/results.md).
  """
  dq_stages: int = 2
  dkv_stages: int = 2
  dkv_order: str = "longest_first"

  def __post_init__(self):
    if min(self.dq_stages, self.dkv_stages) < 2:
      raise ValueError(f"mosaic backward Config(dq_stages={self.dq_stages}, "
                       f"dkv_stages={self.dkv_stages}): each must be >= 2")
    if self.dkv_order not in DKV_ORDERS:
      raise ValueError(f"mosaic backward Config(dkv_order={self.dkv_order!r}): "
                       f"one of {DKV_ORDERS}")


DKV_ORDERS = ("longest_first", "blocks_ascending", "sink_first", "heads_slowest")


def _dkv_launch_order(q_count, order):
  """[B * Hkv * nK] int32: the dk/dv CTAs' tiles, (b * Hkv + h) * nK + kb, in
  the order they launch.

  Every query tile lists the first key block (the kept sink), so its CTAs
  stream G x nQ query tiles, ~2 / (1 - sparsity) times the average under a
  causal mask; launched late they are the kernel's tail. longest_first: by
  listed query tiles, most first, whatever the mask (prefix-LM rows list every
  prefix block); the heads interleave. blocks_ascending: key block by key
  block from the first, every head and batch entry of one block together; a
  constant, so no ordering kernels at run time (longest_first's took ~11 us at
  4k with an argsort, ~6 us with _longest_first's reductions).
  Under a causal or prefix-LM mask with budgets that grow with the visible
  blocks, a block's expected count falls as its index rises, so this is
  longest_first on average; timed in the whole 65% forward + backward it was
  8 us faster at 4k and 35 us slower at 16k (block_k 64). sink_first: the
  sink blocks of every head first, then each head's other blocks in
  ascending order. heads_slowest: head by head. The batch varies fastest in
  the last three. At 16k, 65% (H200): longest_first, sink_first and
  heads_slowest took 1230, 1340 and 1670 us, SMs 98%, 89% and 69% active.
  """
  b, hkv, n_k = q_count.shape
  if order == "longest_first":
    return _longest_first(q_count.reshape(-1))
  tiles = np.arange(b * hkv * n_k, dtype=np.int32).reshape(b, hkv, n_k)   # a constant
  if order == "blocks_ascending":
    return jnp.asarray(tiles.transpose(2, 1, 0).reshape(-1))    # [nK, Hkv, B]
  by_head = tiles.transpose(1, 2, 0)        # [Hkv, nK, B]: heads_slowest
  if order == "heads_slowest":
    return jnp.asarray(by_head.reshape(-1))
  return jnp.asarray(np.concatenate([by_head[:, :1].reshape(-1), by_head[:, 1:].reshape(-1)]))


RANK_MAX_TILES = 4096


def _longest_first(counts):
  """jnp.argsort(-counts, stable=True) for a flat [N] int32, up to
  RANK_MAX_TILES entries without a sort: XLA:GPU sorted the 1024 tiles of the
  benchmarks in one CTA (9 us, plus a 2 us negation kernel), while each
  tile's place, the number of tiles ahead of it (longer, or as long and
  earlier), and the inverse permutation are two fused [N, N] compare-and-sum
  reductions (~3 us each). In the whole 65% fwd + bwd, alternating with the
  sort: 0.3% / 1.2% / 0.2% faster at 4k / 8k / 16k (H200, docs/results.md)."""
  n = counts.shape[0]
  if n > RANK_MAX_TILES:   # N^2 work: the sort wins again
    return jnp.argsort(-counts, stable=True).astype(jnp.int32)
  i = jnp.arange(n, dtype=jnp.int32)
  place = top_k_rank(counts)   # lax.top_k's order: most first, ties to the lower index
  return jnp.sum(jnp.where(place[None, :] == i[:, None], i[None, :], 0), axis=1,
                 dtype=jnp.int32)


def _flat(*tables):
  """Tables as the kernels read them: int32, flat (a row starts at tile * width)."""
  return tuple(x.astype(jnp.int32).reshape(-1) for x in tables)


# ------------------------------------------------------------ pieces ---

@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel bodies need to know at trace time."""
  block_k: int
  group: int          # query heads per kv head
  width: int          # row width of the table the kernel reads
  stages: int         # ring slots
  scale: float        # sm_scale * log2(e): logits in log2 units, for exp2
  sm_scale: float
  dtype: jnp.dtype
  interpret: plgpu.InterpretGPUParams | None
  row_stats: bool = False   # dq computes lse2 and delta (_row_stats)

  @property
  def interpreted(self) -> bool:
    return self.interpret is not None


def _transforms(dtype):
  """Shared-memory layout for wgmma operands and tiled stores (128-byte rows)."""
  return (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(128))


def _dot_t(a_smem, b_smem, rows, cols):
  """a @ b^T on wgmma, both operands in shared memory: [rows, cols] f32."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC((rows, cols), jnp.float32))


def _mma(acc, a, b_smem, interpreted):
  """acc + a @ b with `a` in registers (wgmma), b in shared memory."""
  if interpreted:
    # The GPU interpreter (jax 0.11.2) has neither run_state nor wgmma with A
    # in registers: the same product as a plain dot. Compiled: wgmma in place.
    acc = acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)
    # wgmma reads b through the async proxy, as TMA writes it; the dot reads
    # it through the generic one, so order that read before the slot's next
    # TMA write as the interpreter's race detector wants.
    plgpu.commit_smem()
    return acc

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_smem)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _zeros(shape):
  return plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), plgpu.Layout.WGMMA)


def _mask(x, q0, k0, kv_len, prefix, q_axis):
  """x with -inf at invisible (query, key) pairs; the queries run along
  q_axis from q0, the keys along the other axis from k0."""
  layout = plgpu.Layout.WGMMA
  q_pos = q0 + plgpu.broadcasted_iota(jnp.int32, x.shape, q_axis, layout=layout)
  k_pos = k0 + plgpu.broadcasted_iota(jnp.int32, x.shape, 1 - q_axis, layout=layout)
  visible = (k_pos < kv_len) & ((k_pos < prefix) | (k_pos <= q_pos))
  return jnp.where(visible, x, -jnp.inf)


def _stream(n, locate, fetch, consumed, num_stages):
  """The memory warpgroup: step j's operands into slot j % num_stages once the
  compute warpgroups released the slot's previous step (`consumed` barriers).
  locate(j) does the step's scalar table loads, fetch(location, slot) the TMA."""
  plgpu.set_max_registers(MEMORY_REGS, action="decrease")
  for i in range(num_stages):
    pl.when(i < n)(lambda i=i: fetch(locate(i), i))

  @pl.loop(0, jnp.maximum(n - num_stages, 0))
  def _(j):
    slot = lax.rem(j, num_stages)
    where = locate(j + num_stages)   # loads before the waits: hides their latency
    for bar in consumed:
      plgpu.barrier_wait(bar.at[slot])
    fetch(where, slot)

  # Observe the last releases too, so every barrier phase is waited on before
  # the CTA ends (the interpreter checks this; it costs nothing here).
  @pl.loop(jnp.maximum(n - num_stages, 0), n)
  def _(j):
    for bar in consumed:
      plgpu.barrier_wait(bar.at[lax.rem(j, num_stages)])


def _copy_in(pairs, bars, idx):
  """TMA (gmem, smem) pairs, each on its own barrier bars[i].at[idx]; waits all."""
  for (src, dst), bar in zip(pairs, bars):
    plgpu.copy_gmem_to_smem(src, dst, bar.at[idx])
  for bar in bars:
    plgpu.barrier_wait(bar.at[idx])


# ---------------------------------------------------------------- dq ---

def _log2_lse(lse):
  """The natural-log lse in log2 units, for exp2. Rows without a visible key
  (lse -inf) get 0: every p of theirs is masked, so any finite value does."""
  return jnp.where(lse == -jnp.inf, 0.0, lse * LOG2E)


def _row_stats(do_smem, o_smem, lse_smem, delta_smem):
  """(lse2, delta = rowsum(dO * O)) of 64 rows from their dO, O and natural
  lse in shared memory: in registers, and written over lse_smem and into
  delta_smem for the caller's TMA stores."""
  lse = _log2_lse(plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(1)))
  delta = jnp.sum(do_smem[...].astype(jnp.float32) * o_smem[...].astype(jnp.float32),
                  axis=1)
  lse_smem[...] = lse
  delta_smem[...] = delta
  plgpu.commit_smem()
  return lse, delta


SMEM_BYTES = 227 * 1024   # shared memory a CTA may take on an H100 / H200


def _dq_has_room_for_o(st: _Static, d):
  """Whether the dq kernel's shared memory holds O's rows for _row_stats
  beside q's, dO's, the K/V ring and the row vectors, with 4 KiB to spare
  for barriers, alignment and Mosaic's own (~3 KiB measured). True at block_k
  64 with 2 or 3 ring slots; at block_k 128 the ring leaves 1 KiB too little,
  and XLA computes lse2 and delta (two kernels, ~22 us at 4k, docs/results.md)."""
  item = jnp.dtype(st.dtype).itemsize
  rows = 3 * COMPUTE_WGS * WG_ROWS * d * item
  ring = 2 * st.stages * st.block_k * d * item
  vecs = 2 * COMPUTE_WGS * WG_ROWS * 4
  return rows + ring + vecs + 4096 <= SMEM_BYTES


def _dq_compute_wg(refs, smem, bars, *, qt, n, row, st: _Static):
  """One compute warpgroup: dq of 64 query rows over the listed key blocks.

  st.row_stats: refs' rows are (O, natural lse) and stats (lse2, delta) the
  outputs it computes them into; else rows are (lse2, delta), stats ()."""
  q_ref, do_ref, row_refs, dq_ref, stats_refs, ids_ref, lens_of = refs
  q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, *o_smem2 = smem
  row_bars, (k_bar, v_bar), (k_done, v_done) = bars
  b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  plgpu.set_max_registers(COMPUTE_REGS, action="increase")
  q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
  q_base = qt * TILE_Q + wg * WG_ROWS
  rows, vec = (b, pl.ds(q_base, WG_ROWS), h), (b, h, pl.ds(q_base, WG_ROWS))
  pairs = [(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem)]
  if st.row_stats:
    o_ref, lse_ref = row_refs
    pairs += [(o_ref.at[rows], o_smem2[0].at[wg]), (lse_ref.at[vec], lse_smem2.at[wg])]
  else:
    pairs += [(x.at[vec], y.at[wg]) for x, y in zip(row_refs, (lse_smem2, delta_smem2))]
  _copy_in(pairs, row_bars, wg)
  if st.row_stats:
    lse, delta = _row_stats(do_smem, o_smem2[0].at[wg], lse_smem2.at[wg],
                            delta_smem2.at[wg])
    for src, dst in zip((lse_smem2, delta_smem2), stats_refs):
      plgpu.copy_smem_to_gmem(src.at[wg], dst.at[vec])
  else:
    lse, delta = (plgpu.load(x.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                  for x in (lse_smem2, delta_smem2))
  kv_len, prefix = lens_of(b)
  shape = (WG_ROWS, st.block_k)

  def step(j, dq, masked):
    slot = lax.rem(j, st.stages)
    plgpu.barrier_wait(k_bar.at[slot])
    s = _dot_t(q_smem, k_smem.at[slot], *shape)   # while v may still arrive
    plgpu.barrier_wait(v_bar.at[slot])
    dp = _dot_t(do_smem, v_smem.at[slot], *shape)
    plgpu.barrier_arrive(v_done.at[slot])
    if masked:
      s = _mask(s, q_base, ids_ref[row + j] * st.block_k, kv_len, prefix, q_axis=0)
    # Rows with no visible key have lse 0 (see backward); their s is -inf.
    p = jnp.exp2(s * st.scale - lax.broadcast_in_dim(lse, shape, [0]))
    ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
    dq = _mma(dq, ds.astype(st.dtype), k_smem.at[slot], st.interpreted)
    plgpu.barrier_arrive(k_done.at[slot])
    return dq

  limit = whole_below(q_base, kv_len, prefix)
  dq = split_loop(step, _zeros((WG_ROWS, q_smem.shape[-1])), n,
                  lambda j: ids_ref[row + jnp.minimum(j, st.width - 1)],
                  lambda kb: (kb + 1) * st.block_k <= limit, first_masked=False)
  q_smem[...] = (dq * st.sm_scale).astype(st.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
  plgpu.wait_smem_to_gmem(0)   # also any lse2 and delta stores


def _dq_memory_wg(k_ref, v_ref, ids_ref, smem, bars, *, n, row, st: _Static):
  """Streams the listed K and V blocks of this tile's kv head."""
  k_smem, v_smem = smem[4:6]
  _, (k_bar, v_bar), consumed = bars
  b, kv_head = lax.axis_index("batch"), lax.div(lax.axis_index("heads"), st.group)

  def fetch(kb, slot):
    rows = (b, pl.ds(kb * st.block_k, st.block_k), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])
  _stream(n, lambda j: ids_ref[row + j], fetch, consumed, st.stages)


def _dq(q, k, v, d_out, row_inputs, tables, lens, st: _Static):
  """st.row_stats: row_inputs (out, natural lse) -> (dq, lse2, delta), the
  last two [B, Hq, T] f32 for _dkv. Else row_inputs (lse2, delta) -> (dq,)."""
  b, t, hq, d = q.shape
  hkv, n_q = k.shape[2], t // TILE_Q
  ids, counts = _flat(tables.kv_ids, tables.kv_count)
  n_lens = len(lens.arrays)
  n_stats = 2 if st.row_stats else 0

  def body(q_ref, k_ref, v_ref, do_ref, row_a, row_b, ids_ref, counts_ref, *refs):
    lens_of = lens.reader(refs[:n_lens])
    dq_ref, *stats_refs = refs[n_lens:n_lens + 1 + n_stats]
    smem, bars = refs[n_lens + 1 + n_stats:]
    bi, h = lax.axis_index("batch"), lax.axis_index("heads")
    qt = n_q - 1 - lax.axis_index("q_seq")   # longest (causal) tiles first
    tile = (bi * hkv + lax.div(h, st.group)) * n_q + qt
    n = counts_ref[tile]

    @pl.when(lax.axis_index("wg") < COMPUTE_WGS)
    def _():
      _dq_compute_wg((q_ref, do_ref, (row_a, row_b), dq_ref, stats_refs, ids_ref, lens_of),
                     smem, bars, qt=qt, n=n, row=tile * st.width, st=st)

    @pl.when(lax.axis_index("wg") == COMPUTE_WGS)
    def _():
      _dq_memory_wg(k_ref, v_ref, ids_ref, smem, bars, n=n, row=tile * st.width, st=st)

  tiled = _transforms(st.dtype)
  rows = plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), st.dtype, transforms=tiled)
  vecs = plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32)
  ring = plgpu.SMEM((st.stages, st.block_k, d), st.dtype, transforms=tiled)
  slots = plgpu.Barrier(num_barriers=st.stages)
  released = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=st.stages)
  row_f32 = jax.ShapeDtypeStruct((b, hq, t), jnp.float32)
  o_rows = (rows,) if st.row_stats else ()
  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q.shape, st.dtype),) + (row_f32,) * n_stats,
      scratch_types=((rows, rows, vecs, vecs, ring, ring, *o_rows),
                     ((plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 4, (slots, slots),
                      (released, released))),
      grid=(hq, n_q, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=st.interpret,
  )(q, k, v, d_out, *row_inputs, ids, counts, *lens.arrays)


# ------------------------------------------------------------- dk/dv ---

def _dv_and_dp_t(dv, p_t, v_smem, do_smem, interpreted):
  """(dv + pT dO, v dO^T) as one wgmma group: one wait for both, as in
  attention_mgpu.py."""
  if interpreted:   # as in _mma: register-A wgmma and run_state are compiled-only
    return _mma(dv, p_t, do_smem, True), _dot_t(v_smem, do_smem, *p_t.shape)

  def body(refs):
    dv_ref, dp_ref = refs
    plgpu.wgmma(dv_ref, p_t, do_smem)
    plgpu.wgmma(dp_ref, v_smem, do_smem.transpose((1, 0)))
  return pl.run_state(body)((plgpu.ACC.init(dv), plgpu.ACC.init(_zeros(p_t.shape))))


def _dkv_tile(carry, kv_smem, q_smem, do_smem, lse_smem, delta_smem, mask, st: _Static):
  """One 64 x 64 tile, keys x queries: dv += pT dO, dk += dsT q (dk unscaled).
  Three wgmma groups: sT; (dv, dpT); dk."""
  dk, dv = carry
  k_smem, v_smem = kv_smem
  shape = (WG_ROWS, WG_ROWS)
  s_t = _dot_t(k_smem, q_smem, *shape)
  if mask is not None:
    s_t = mask(s_t)
  p_t = jnp.exp2(s_t * st.scale - _col_bcast(lse_smem, shape))
  dv, dp_t = _dv_and_dp_t(dv, p_t.astype(st.dtype), v_smem, do_smem, st.interpreted)
  ds_t = p_t * (dp_t - _col_bcast(delta_smem, shape))
  dk = _mma(dk, ds_t.astype(st.dtype), q_smem, st.interpreted)
  return dk, dv


def _col_bcast(vec_smem, shape):
  """A per-query vector from shared memory, broadcast over a keys x queries tile."""
  vec = plgpu.load(vec_smem, layout=plgpu.Layout.WGMMA.reduce(0))
  return lax.broadcast_in_dim(vec, shape, [1])


def _store_dkv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, keys, dtype):
  """dk, dv to HBM through the K/V shared memory, free once the loop is done."""
  k_smem[...] = dk.astype(dtype)
  v_smem[...] = dv.astype(dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
  plgpu.wait_smem_to_gmem(0)


def _sum_partials(parts, red_smem, sync, wg):
  """block_k 64: each partial of warpgroup 1 goes to warpgroup 0 through one
  f32 shared-memory buffer. Only warpgroup 0's sums are the totals."""
  def both_here():
    plgpu.barrier_arrive(sync)
    plgpu.barrier_wait(sync)

  totals = []
  for x in parts:
    @pl.when(wg == 1)
    def _(x=x):
      red_smem[...] = x
    both_here()
    totals.append(x + red_smem[...])
    both_here()        # the buffer is free again
  return totals


def _dkv_compute_wg(refs, smem, bars, *, b, h, kb, n_steps, row, st: _Static):
  """One compute warpgroup: dk, dv of 64 keys over the streamed query tiles,
  the masked ones first (block_tables.whole_below)."""
  k_ref, v_ref, dk_ref, dv_ref, ids_ref, lens_of = refs
  k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, *red = smem
  (k_bar, v_bar), ring_bars, done, sync = bars
  wg = lax.axis_index("wg")
  plgpu.set_max_registers(COMPUTE_REGS, action="increase")
  split_keys = st.block_k == 2 * WG_ROWS
  kh = wg if split_keys else 0                  # this warpgroup's 64 keys: half kh
  q_halves = (0, 1) if split_keys else (wg,)    # its 64-row halves of each tile
  k0 = kb * st.block_k + kh * WG_ROWS
  keys = (b, pl.ds(k0, WG_ROWS), h)
  # A slice, not .at[kh]: a constant integer index on a ref used inside
  # run_state fails to lower (jax 0.11.2), and kh is the constant 0 at block_k 64.
  kv_smem = tuple(x.at[pl.ds(kh * WG_ROWS, WG_ROWS)] for x in (k_smem, v_smem))

  @pl.when(wg == kh)      # block_k 64: warpgroup 0 loads the keys both read
  def _():
    plgpu.copy_gmem_to_smem(k_ref.at[keys], kv_smem[0], k_bar.at[kh])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], kv_smem[1], v_bar.at[kh])
  plgpu.barrier_wait(k_bar.at[kh])
  plgpu.barrier_wait(v_bar.at[kh])
  kv_len, prefix = lens_of(b)

  def step(j, carry, masked):
    slot = lax.rem(j, st.stages)
    q_tile = ids_ref[row + lax.div(j, st.group)] if masked else None
    for bar in ring_bars:
      plgpu.barrier_wait(bar.at[slot])
    for half in q_halves:
      rows = pl.ds(half * WG_ROWS, WG_ROWS)
      mask = None if not masked else functools.partial(
          _mask, q0=q_tile * TILE_Q + half * WG_ROWS, k0=k0, kv_len=kv_len,
          prefix=prefix, q_axis=1)
      carry = _dkv_tile(carry, kv_smem, q_smem.at[slot, rows], do_smem.at[slot, rows],
                        lse_smem.at[slot, rows], delta_smem.at[slot, rows], mask, st)
    plgpu.barrier_arrive(done.at[slot])
    return carry

  first_row = 0 if split_keys else wg * WG_ROWS   # of this warpgroup's rows in a tile
  dk, dv = split_loop(
      step, (_zeros((WG_ROWS, k_smem.shape[-1])),) * 2, n_steps,
      lambda j: ids_ref[row + jnp.minimum(lax.div(j, st.group), st.width - 1)],
      lambda qt: k0 + WG_ROWS > whole_below(qt * TILE_Q + first_row, kv_len, prefix),
      first_masked=True)
  dk *= st.sm_scale
  store = functools.partial(_store_dkv, k_smem=kv_smem[0], v_smem=kv_smem[1],
                            dk_ref=dk_ref, dv_ref=dv_ref, keys=keys, dtype=st.dtype)
  if split_keys:
    store(dk, dv)
  else:
    dk, dv = _sum_partials((dk, dv), red[0], sync, wg)
    pl.when(wg == 0)(lambda: store(dk, dv))


def _dkv_memory_wg(q_ref, do_ref, lse_ref, delta_ref, ids_ref, smem, bars, *, b, h,
                   n_steps, row, st: _Static):
  """Streams, per listed query tile and query head of the group, 128 rows of
  q, dO, lse and delta."""
  ring = smem[2:6]
  _, ring_bars, done, _ = bars

  def locate(j):   # step j: tile ids[j // G], query head h * G + j % G
    return ids_ref[row + lax.div(j, st.group)], h * st.group + lax.rem(j, st.group)

  def fetch(where, slot):
    q_tile, head = where
    rows = pl.ds(q_tile * TILE_Q, TILE_Q)
    srcs = (q_ref.at[b, rows, head], do_ref.at[b, rows, head],
            lse_ref.at[b, head, rows], delta_ref.at[b, head, rows])
    for src, dst, bar in zip(srcs, ring, ring_bars):
      plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot])
  _stream(n_steps, locate, fetch, (done,), st.stages)


def _dkv(q, k, v, d_out, lse2, delta, tables, lens, st: _Static, order: str):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  n_k = s // st.block_k
  ids, counts = _flat(tables.q_ids, tables.q_count)
  launch = _dkv_launch_order(tables.q_count, order)

  n_lens = len(lens.arrays)

  def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, counts_ref,
           launch_ref, *refs):
    lens_of = lens.reader(refs[:n_lens])
    dk_ref, dv_ref, smem, bars = refs[n_lens:]
    # One flat launch axis (CUDA's x, the only one past 65535), read through
    # the launch order.
    tile = launch_ref[lax.axis_index("ctas")]
    bi, h, kb = lax.div(tile, hkv * n_k), lax.rem(lax.div(tile, n_k), hkv), lax.rem(tile, n_k)
    n_steps = counts_ref[tile] * st.group

    @pl.when(lax.axis_index("wg") < COMPUTE_WGS)
    def _():
      _dkv_compute_wg((k_ref, v_ref, dk_ref, dv_ref, ids_ref, lens_of),
                      smem, bars, b=bi, h=h, kb=kb, n_steps=n_steps,
                      row=tile * st.width, st=st)

    @pl.when(lax.axis_index("wg") == COMPUTE_WGS)
    def _():
      _dkv_memory_wg(q_ref, do_ref, lse_ref, delta_ref, ids_ref, smem, bars, b=bi, h=h,
                     n_steps=n_steps, row=tile * st.width, st=st)

  halves = st.block_k // WG_ROWS
  tiled = _transforms(st.dtype)
  kv = plgpu.SMEM((st.block_k, d), st.dtype, transforms=tiled)
  rows = plgpu.SMEM((st.stages, TILE_Q, d), st.dtype, transforms=tiled)
  vecs = plgpu.SMEM((st.stages, TILE_Q), jnp.float32)
  # block_k 64: warpgroup 1's partial dk, dv (f32) on its way to warpgroup 0.
  red = (plgpu.SMEM((WG_ROWS, d), jnp.float32, transforms=_transforms(jnp.float32)),
         ) if halves == 1 else ()
  kv_bar = plgpu.Barrier(num_barriers=halves)
  slots = plgpu.Barrier(num_barriers=st.stages)
  return plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(k.shape, st.dtype),) * 2,
      scratch_types=((kv, kv, rows, rows, vecs, vecs, *red),
                     ((kv_bar, kv_bar), (slots,) * 4,
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=st.stages),
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS))),
      grid=(b * hkv * n_k,),
      grid_names=("ctas",),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=st.interpret,
  )(q, k, v, d_out, lse2, delta, ids, counts, launch, *lens.arrays)


# ------------------------------------------------------------ public ---

def unsupported(q, k, block_sizes) -> str | None:
  """Why these kernels cannot take these shapes (None: they can)."""
  t, d, s = q.shape[1], q.shape[-1], k.shape[1]
  if q.dtype != k.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"mosaic sparse backward wants bf16/f16 q, k, v; got {q.dtype}, {k.dtype}"
  if block_sizes.block_q != TILE_Q or block_sizes.block_k not in (64, 128):
    return (f"mosaic sparse backward needs block_q={TILE_Q} and block_k in (64, 128); "
            f"got {block_sizes}")
  if d % 64 or d > 128:   # the dk/dv ring holds 2 x 128 rows of q and dO a slot
    return f"head_dim={d} must be 64 or 128"
  if t % TILE_Q or s % block_sizes.block_k:
    return (f"seq_len={t} must be a multiple of {TILE_Q} and kv_seq_len={s} "
            f"of block_k={block_sizes.block_k}")
  return None


def _check(q, k, v, tables, out, d_out, block_sizes):
  b, hkv = q.shape[0], k.shape[2]
  check_qkv(q, k, v)
  if out.shape != q.shape or d_out.shape != q.shape:
    raise ValueError(f"{out.shape=} and {d_out.shape=} must be {q.shape=}")
  if reason := unsupported(q, k, block_sizes):
    raise ValueError(reason)
  check_kv_tables(tables, q, k, TILE_Q)
  n_k = k.shape[1] // block_sizes.block_k
  if tables.q_ids is not None and tables.q_ids.shape[:3] != (b, hkv, n_k):
    raise ValueError(f"{tables.q_ids.shape=} must start with (B, Hkv, nK)={(b, hkv, n_k)}")


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "config", "interpret"))
def backward(q, k, v, tables: BlockTables, kv_len, prefix_len, out, lse, d_out, *,
             block_sizes: BlockSizes, sm_scale: float | None = None,
             config: Config = Config(), interpret=None):
  """(dq, dk, dv) of block-sparse attention, from the forward's out and lse.

  q, out, d_out [B, T, Hq, D]; k, v [B, S, Hkv, D]; lse [B, Hq, T] f32, the
  natural-log row logsumexp of the scaled logits (-inf on rows with no
  visible key: they contribute nothing). kv_len / prefix_len: [B] int32, or
  None for static full lengths / no prefix. Semantics of reference.py and of
  triton_backward.backward. Tables without q_ids get them here.
  interpret: None or False (compile for the GPU), True or a
  plgpu.InterpretGPUParams (the GPU interpreter, on the CPU).
  """
  _check(q, k, v, tables, out, d_out, block_sizes)
  interpret = plgpu.InterpretGPUParams() if interpret is True else (interpret or None)
  d, hkv, bk = q.shape[-1], k.shape[2], block_sizes.block_k
  tables = select_triton.with_q_tables(tables, k.shape[1] // bk,
                                      interpret=interpret is not None)
  sm_scale = d ** -0.5 if sm_scale is None else sm_scale
  lens = kernel_lengths(kv_len, prefix_len, k.shape[1])
  lse = lse.astype(jnp.float32)
  st = _Static(block_k=bk, group=q.shape[2] // hkv, width=tables.kv_ids.shape[-1],
               stages=config.dq_stages, scale=sm_scale * LOG2E, sm_scale=sm_scale,
               dtype=q.dtype, interpret=interpret)
  st = dataclasses.replace(st, row_stats=_dq_has_room_for_o(st, d))
  do = d_out.astype(q.dtype)
  if st.row_stats:
    dq, lse2, delta = _dq(q, k, v, do, (out.astype(q.dtype), lse), tables, lens, st)
  else:
    lse2 = _log2_lse(lse)
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dq, = _dq(q, k, v, do, (lse2, delta), tables, lens, st)
  st = dataclasses.replace(st, width=tables.q_ids.shape[-1], stages=config.dkv_stages)
  dk, dv = _dkv(q, k, v, do, lse2, delta, tables, lens, st, config.dkv_order)
  return dq, dk, dv
