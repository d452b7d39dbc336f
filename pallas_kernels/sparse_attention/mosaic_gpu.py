"""Block-sparse attention forward for Hopper, through Pallas Mosaic GPU.

FA3-style: CTAs of three warpgroups, each CTA computing one (query head,
query tile of 2 x 64 rows, batch) tile, or with Config.persistent_ctas one
wave of CTAs looping over the tiles (_work deals them out). The memory
warpgroup loads each tile's q and streams K/V blocks with TMA into a ring of
`num_stages` shared-memory slots, but only the blocks listed for the tile in
`kv_ids[:kv_count]`; the two compute warpgroups each own 64 query rows, run
QK^T and PV on wgmma, and keep an online softmax in registers. A schedule
barrier alternates the two warpgroups' softmax with the other's matmuls, so
the tensor cores stay busy (the pattern of JAX's attention_mgpu.py).

One table row serves the whole CTA (128 query rows): the tables' block_q is
128. Blocks the element mask leaves fully visible to a warpgroup's rows (the
ascending list's leading entries; the kernel finds them as it goes, see
_attend) skip the mask arithmetic; the rest apply causal + prefix + kv_len
exactly, so partial tiles are right.

Rows with no visible key output 0; `lse` (natural log) is -inf there.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention import mosaic_gpu_backward
from pallas_kernels.sparse_attention.block_tables import (
    BlockSizes, BlockTables, check_kv_tables, check_qkv, kernel_lengths, split_loop,
    whole_below)

WG_ROWS = 64          # query rows per compute warpgroup (one wgmma M tile)
COMPUTE_WGS = 2
TILE_Q = WG_ROWS * COMPUTE_WGS
LOG2E = math.log2(math.e)
# Finite start for the running max: a row whose first visited tiles are fully
# masked then keeps alpha = 1 and p = 0 instead of exp2(-inf - -inf) = NaN.
M_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class Config:
  """num_stages: K/V shared-memory slots in flight (>= 2). backward: the
  mosaic_gpu_backward.Config of the dq and dk/dv kernels behind
  sparse_attention's custom_vjp. persistent_ctas: 0 launches a CTA per
  (query head, query tile, batch); n > 0 launches min(n, tiles) CTAs (the
  GPU's SM count: one wave) that each loop over tiles, so the K/V ring runs on
  from one tile to the next and the next tile's q arrives while this one
  computes (q double-buffered: 64 KiB of shared memory at head_dim 128).
  Off by default: timed with the batch-slowest tile order it lost (H200, 65%,
  kernel alone: 0.258 against 0.246 ms at 4k); the balanced order _work now
  deals is untimed (docs/results.md)."""
  num_stages: int = 2
  backward: mosaic_gpu_backward.Config = mosaic_gpu_backward.Config()
  persistent_ctas: int = 0

  def __post_init__(self):
    if self.num_stages < 2:
      raise ValueError(f"mosaic Config.num_stages={self.num_stages} must be >= 2")
    if self.persistent_ctas < 0:
      raise ValueError(f"mosaic Config.persistent_ctas={self.persistent_ctas} must be >= 0")


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel bodies need to know at trace time."""
  block_k: int
  num_stages: int
  scale: float          # sm_scale * log2(e): logits in log2 units, for exp2
  dtype: jnp.dtype
  interpreted: bool
  batch: int
  hq: int
  group: int            # query heads per kv head
  n_q: int              # query tiles a (batch, head)
  width: int            # row width of the tables
  ctas: int             # CTAs launched (_work deals them the tiles)

  @property
  def tiles(self) -> int:
    return self.batch * self.hq * self.n_q

  @property
  def q_bufs(self) -> int:
    """q buffers: 2 where a CTA has several tiles (the next one's q loads early)."""
    return 1 if self.ctas == self.tiles else 2


def _work(c, i, st: _Static):
  """(batch, query head, query tile, table row) of CTA c's i-th tile.

  Tiles count heads fastest, then the batch, then query tiles from the last:
  under a causal or prefix-LM mask with a budget that grows with the visible
  blocks, longest first over the whole batch. CTA c takes tile c, then
  2P - 1 - c, 2P + c, ... (P CTAs): a snake, so no CTA gets the longest tile
  of every round. With the batch slowest instead, every batch restarts the
  descent and the snake overloads some CTAs by 26-29% at 4k (4 x 32 tiles a
  head; see docs/results.md).
  """
  p = st.ctas
  w = i * p + jnp.where(lax.rem(i, 2) == 0, c, p - 1 - c)
  h, r = lax.rem(w, st.hq), lax.div(w, st.hq)
  b, qt = lax.rem(r, st.batch), st.n_q - 1 - lax.div(r, st.batch)
  return b, h, qt, (b * (st.hq // st.group) + lax.div(h, st.group)) * st.n_q + qt


def _tile_count(c, st: _Static):
  """How many tiles CTA c takes (_work's snake over st.tiles)."""
  rounds, rest = divmod(st.tiles, st.ctas)
  last = c if rounds % 2 == 0 else st.ctas - 1 - c
  return rounds + jnp.asarray(last < rest, jnp.int32)


def _attend(qo_smem, ring, ids_ref, *, q_base, n, row, pos, lens, on_start, st: _Static):
  """Online softmax of one compute warpgroup's 64 query rows (in qo_smem) over
  the tile's n listed K/V blocks, which arrive in ring positions pos, pos + 1,
  ... (slot: position mod num_stages). on_start() runs once the first block is
  in (the previous tile's release, overlapped with that wait). Returns
  (acc, m_i, l_i).

  Blocks every row here sees whole skip the mask arithmetic; in an ascending
  list they come first (block_tables.whole_below, split_loop).
  """
  k_smem, v_smem, (k_bar, v_bar), (k_done, v_done), sched = ring
  limit = whole_below(q_base, *lens)
  kv_len, prefix = lens
  id_at = lambda j: ids_ref[row + jnp.minimum(j, st.width - 1)]
  wg = lax.axis_index("wg")
  slot_of = lambda j: lax.rem(pos + j, st.num_stages)
  shape = (WG_ROWS, st.block_k)

  def schedule():
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)

  wgmma_row = plgpu.Layout.WGMMA.reduce(1)
  m_i = plgpu.layout_cast(jnp.full((WG_ROWS,), M_INIT, jnp.float32), wgmma_row)
  l_i = plgpu.layout_cast(jnp.full((WG_ROWS,), 0, jnp.float32), wgmma_row)
  acc = plgpu.layout_cast(jnp.full((WG_ROWS, qo_smem.shape[-1]), 0, jnp.float32),
                          plgpu.Layout.WGMMA)

  @pl.when(n > 0)
  def _():
    plgpu.barrier_wait(k_bar.at[slot_of(0)])

  on_start()
  pl.when(wg == 1)(schedule)

  def step(j, carry, masked):
    acc, m_i, l_i = carry
    slot = slot_of(j)
    # The block id's load goes out before the matmul, which hides its latency.
    kb = ids_ref[row + j] if masked else None

    def qk_dot(acc_ref):
      plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
      schedule()
      return acc_ref[...]
    qk = pl.run_scoped(qk_dot, plgpu.ACC(shape, jnp.float32))
    plgpu.barrier_arrive(k_done.at[slot])
    if masked:
      layout = plgpu.Layout.WGMMA
      q_pos = q_base + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
      k_pos = kb * st.block_k + plgpu.broadcasted_iota(
          jnp.int32, shape, 1, layout=layout)
      visible = (k_pos < kv_len) & ((k_pos < prefix) | (k_pos <= q_pos))
      qk = jnp.where(visible, qk, -jnp.inf)

    # Scores in log2 units: one FMA per element before exp2.
    m_new = jnp.maximum(m_i, qk.max(axis=1) * st.scale)
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(qk * st.scale - lax.broadcast_in_dim(m_new, qk.shape, [0]))
    acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
    l_i = l_i * alpha + p.sum(axis=1)
    p16 = p.astype(st.dtype)
    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
    plgpu.barrier_arrive(sched)        # softmax done
    plgpu.barrier_wait(v_bar.at[slot])
    plgpu.barrier_wait(sched)          # the other warpgroup left the tensor cores

    def wait_next_k():
      @pl.when(j + 1 < n)
      def _():
        plgpu.barrier_wait(k_bar.at[slot_of(j + 1)])

    def pv_dot(acc_ref):
      plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
      wait_next_k()       # overlaps the next K's arrival with this wgmma

    if st.interpreted:
      # The GPU interpreter (jax 0.11.2) has neither run_state nor wgmma with
      # A in registers: the same product as a plain dot. Compiled code
      # accumulates in place on the tensor cores.
      acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
      plgpu.commit_smem()   # a wgmma reads through the async proxy; so must this read
      wait_next_k()
    else:
      acc = pl.run_state(pv_dot)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(v_done.at[slot])
    return acc, m_new, l_i

  carry = split_loop(step, (acc, m_i, l_i), n, id_at,
                     lambda kb: (kb + 1) * st.block_k <= limit, first_masked=False)
  pl.when(wg == 0)(schedule)
  return carry


def _store_rows(acc, m_i, l_i, qo_smem, lse_smem, out_rows, lse_rows, dtype):
  """Issues the TMA stores of 64 normalized output rows (through qo_smem, whose
  q is spent) and their lse; the caller waits for them."""
  # l_i >= 1 on any row that saw a key (its max contributes exp2(0)); 0 else.
  # One division a row, then a multiply an element: an f32 division is an
  # IEEE div.rn sequence of ~8 instructions, and 64 of them a thread here would
  # be the tile's epilogue, where neither warpgroup's matmuls cover it.
  acc *= lax.broadcast_in_dim(1.0 / jnp.maximum(l_i, 1.0), acc.shape, [0])
  qo_smem[...] = acc.astype(dtype)
  lse_smem[...] = (m_i + jnp.log2(l_i)) * (1.0 / LOG2E)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qo_smem, out_rows)
  plgpu.copy_smem_to_gmem(lse_smem, lse_rows)


def _count_of(cta, i, count, counts_ref, st: _Static):
  """The block count of CTA cta's i-th tile, i clamped into [0, count)."""
  return counts_ref[_work(cta, jnp.maximum(jnp.minimum(i, count - 1), 0), st)[3]]


def _compute_wg(refs, scratch, st: _Static):
  """One compute warpgroup: 64 query rows of each of this CTA's tiles."""
  out_ref, lse_ref, ids_ref, counts_ref, lens_of = refs
  q_smem, lse_smem2, ring, (q_bar, q_free) = scratch
  wg, cta = lax.axis_index("wg"), lax.axis_index("ctas")
  count = _tile_count(cta, st)
  plgpu.set_max_registers(mosaic_gpu_backward.COMPUTE_REGS, action="increase")

  def release(i):
    """Once its output stores have read them, tile i's q buffer may take a
    later tile's q (and lse's buffer this warpgroup's next rows)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    plgpu.barrier_arrive(q_free.at[lax.rem(i, st.q_bufs)])

  def tile(i, carry):
    pos, n = carry
    # The next tile's count loads now and arrives while this tile computes.
    next_n = _count_of(cta, i + 1, count, counts_ref, st)
    b, h, qt, t = _work(cta, i, st)
    buf = lax.rem(i, st.q_bufs)
    qo_smem, q_base = q_smem.at[buf, wg], qt * TILE_Q + wg * WG_ROWS
    plgpu.barrier_wait(q_bar.at[buf * COMPUTE_WGS + wg])
    # The previous tile's stores read shared memory while this tile's first
    # K/V block arrives: its release waits here, not at that tile's end.
    on_start = lambda: pl.when(i > 0)(lambda: release(i - 1))
    acc, m_i, l_i = _attend(qo_smem, ring, ids_ref, q_base=q_base, n=n, row=t * st.width,
                            pos=pos, lens=lens_of(b), on_start=on_start, st=st)
    _store_rows(acc, m_i, l_i, qo_smem, lse_smem2.at[wg],
                out_ref.at[b, pl.ds(q_base, WG_ROWS), h],
                lse_ref.at[b, h, pl.ds(q_base, WG_ROWS)], st.dtype)
    return pos + n, next_n

  lax.fori_loop(0, count, tile, (jnp.int32(0), _count_of(cta, 0, count, counts_ref, st)))
  pl.when(count > 0)(lambda: release(count - 1))
  plgpu.wait_smem_to_gmem(0)


def _memory_wg(refs, scratch, st: _Static):
  """The TMA warpgroup: each tile's q, and its listed K/V blocks into the ring."""
  q_ref, k_ref, v_ref, ids_ref, counts_ref = refs
  q_smem, _, (k_smem, v_smem, (k_bar, v_bar), (k_done, v_done), _), (q_bar, q_free) = scratch
  plgpu.set_max_registers(mosaic_gpu_backward.MEMORY_REGS, action="decrease")
  cta = lax.axis_index("ctas")
  count = _tile_count(cta, st)

  def load_q(i):
    b, h, qt, _ = _work(cta, i, st)
    buf = lax.rem(i, st.q_bufs)
    for wg in range(COMPUTE_WGS):
      rows = (b, pl.ds(qt * TILE_Q + wg * WG_ROWS, WG_ROWS), h)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[buf, wg],
                              q_bar.at[buf * COMPUTE_WGS + wg])

  pl.when(count > 0)(lambda: load_q(0))

  def tile(i, carry):
    pos, n = carry
    # The next tile's count loads now; it arrives while this tile streams.
    next_n = _count_of(cta, i + 1, count, counts_ref, st)
    b, h, _, t = _work(cta, i, st)
    row, kv_head = t * st.width, lax.div(h, st.group)

    def fetch(j):
      slot = lax.rem(pos + j, st.num_stages)
      kb = ids_ref[row + j]   # load before the waits: hides its latency

      @pl.when(pos + j >= st.num_stages)
      def _():
        plgpu.barrier_wait(k_done.at[slot])
        plgpu.barrier_wait(v_done.at[slot])
      rows = (b, pl.ds(kb * st.block_k, st.block_k), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

    # The first blocks wait only on the last tile's; then the next tile's q,
    # which waits for the tile that last used its buffer to store its output.
    first = jnp.minimum(n, st.num_stages)
    pl.loop(0, first)(fetch)

    @pl.when(i + 1 < count)
    def _():
      pl.when(i + 1 >= st.q_bufs)(
          lambda: plgpu.barrier_wait(q_free.at[lax.rem(i + 1, st.q_bufs)]))
      load_q(i + 1)

    pl.loop(first, n)(fetch)
    return pos + n, next_n

  total, _ = lax.fori_loop(0, count, tile,
                           (jnp.int32(0), _count_of(cta, 0, count, counts_ref, st)))

  # Observe the last consumptions and stores too, so every barrier phase is
  # waited on before the CTA ends (the interpreter checks this; it costs
  # nothing here).
  @pl.loop(jnp.maximum(total - st.num_stages, 0), total)
  def _(p):
    plgpu.barrier_wait(k_done.at[lax.rem(p, st.num_stages)])
    plgpu.barrier_wait(v_done.at[lax.rem(p, st.num_stages)])

  @pl.loop(jnp.maximum(count - st.q_bufs, 0), count)
  def _(i):
    plgpu.barrier_wait(q_free.at[lax.rem(i, st.q_bufs)])


def unsupported(q, k, block_sizes) -> str | None:
  """Why this kernel cannot take these shapes (None: it can)."""
  t, d, s = q.shape[1], q.shape[-1], k.shape[1]
  if not q.dtype == k.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"mosaic sparse attention wants bf16/f16 q, k, v; got {q.dtype}, {k.dtype}"
  if block_sizes.block_q != TILE_Q or block_sizes.block_k not in (64, 128):
    return (f"mosaic sparse attention needs block_q={TILE_Q} and block_k in (64, 128); "
            f"got {block_sizes}")
  if d % 64 or d > 128:   # the backward's register budget sets the 128
    return f"head_dim={d} must be a multiple of 64, at most 128"
  if t % TILE_Q or s % block_sizes.block_k:
    return (f"seq_len={t} must be a multiple of {TILE_Q} and kv_seq_len={s} "
            f"of block_k={block_sizes.block_k}")
  return None


def _check(q, k, v, tables, block_sizes):
  check_qkv(q, k, v)
  if reason := unsupported(q, k, block_sizes):
    raise ValueError(reason)
  check_kv_tables(tables, q, k, TILE_Q)


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "config", "interpret"))
def sparse_attention_fwd(q, k, v, tables: BlockTables, kv_len, prefix_len, *,
                         block_sizes: BlockSizes, sm_scale: float | None = None,
                         config: Config = Config(), interpret=None):
  """q [B, T, Hq, D], k/v [B, S, Hkv, D] -> (out [B, T, Hq, D], lse [B, Hq, T] f32).

  Semantics of reference.py; lse is the natural-log row logsumexp of the
  scaled logits over visible keys (-inf for rows with none). kv_len None:
  every key is valid; prefix_len None: no bidirectional prefix (causal).
  """
  _check(q, k, v, tables, block_sizes)
  b, t, hq, d = q.shape
  bk, dtype = block_sizes.block_k, q.dtype
  n_q = t // TILE_Q
  tiles = b * hq * n_q
  ctas = min(config.persistent_ctas, tiles) if config.persistent_ctas else tiles
  st = _Static(block_k=bk, num_stages=config.num_stages,
               scale=(d ** -0.5 if sm_scale is None else sm_scale) * LOG2E, dtype=dtype,
               interpreted=interpret is not None, batch=b, hq=hq, group=hq // k.shape[2],
               n_q=n_q, width=tables.kv_ids.shape[-1], ctas=ctas)
  lens = kernel_lengths(kv_len, prefix_len, k.shape[1])
  # Flat tables: one scalar load per lookup, no multi-dim index arithmetic.
  ids = tables.kv_ids.astype(jnp.int32).reshape(-1)
  counts = tables.kv_count.astype(jnp.int32).reshape(-1)

  def body(q_ref, k_ref, v_ref, ids_ref, counts_ref, *refs):
    n_lens = len(lens.arrays)
    lens_of = lens.reader(refs[:n_lens])
    out_ref, lse_ref = refs[n_lens:n_lens + 2]
    scratch = refs[n_lens + 2:]

    @pl.when(lax.axis_index("wg") < COMPUTE_WGS)
    def _():
      _compute_wg((out_ref, lse_ref, ids_ref, counts_ref, lens_of), scratch, st)

    @pl.when(lax.axis_index("wg") == COMPUTE_WGS)
    def _():
      _memory_wg((q_ref, k_ref, v_ref, ids_ref, counts_ref), scratch, st)

  transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(128))
  stages, arrivals = config.num_stages, dict(num_arrivals=COMPUTE_WGS)
  ring = (plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
          plgpu.SMEM((stages, bk, d), dtype, transforms=transforms),
          (plgpu.Barrier(num_barriers=stages),) * 2,
          (plgpu.Barrier(**arrivals, num_barriers=stages),) * 2,
          plgpu.Barrier(**arrivals))
  scratch = (plgpu.SMEM((st.q_bufs, COMPUTE_WGS, WG_ROWS, d), dtype, transforms=transforms),
             plgpu.SMEM((COMPUTE_WGS, WG_ROWS), jnp.float32),
             ring,
             (plgpu.Barrier(num_barriers=st.q_bufs * COMPUTE_WGS),
              plgpu.Barrier(**arrivals, num_barriers=st.q_bufs)))
  out, lse = plgpu.kernel(
      body,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, hq, t), jnp.float32)),
      scratch_types=scratch,
      grid=(ctas,),
      grid_names=("ctas",),
      num_threads=COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
  )(q, k, v, ids, counts, *lens.arrays)
  return out, lse


# ------------------------------------------------------------ custom_vjp ---

def _forward(q, k, v, tables, kv_len, prefix_len, block_sizes, sm_scale, config, interpret):
  return sparse_attention_fwd(
      q, k, v, tables, kv_len, prefix_len, block_sizes=block_sizes, sm_scale=sm_scale,
      config=config, interpret=plgpu.InterpretGPUParams() if interpret else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, tables, kv_len, prefix_len, *static):
  return _forward(q, k, v, tables, kv_len, prefix_len, *static)[0]


def _attention_fwd(q, k, v, tables, kv_len, prefix_len, *static):
  out, lse = _forward(q, k, v, tables, kv_len, prefix_len, *static)
  return out, (q, k, v, tables, kv_len, prefix_len, out, lse)


def _attention_bwd(block_sizes, sm_scale, config, interpret, residuals, d_out):
  """The Mosaic dq and dk/dv kernels (mosaic_gpu_backward.py), from the lse."""
  q, k, v, tables, kv_len, prefix_len, out, lse = residuals
  dq, dk, dv = mosaic_gpu_backward.backward(
      q, k, v, tables, kv_len, prefix_len, out, lse, d_out, block_sizes=block_sizes,
      sm_scale=sm_scale, config=config.backward, interpret=interpret)
  # Tables and lengths are integers: no cotangent.
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes", "sm_scale", "config", "interpret"))
def sparse_attention(q, k, v, tables: BlockTables, kv_len, prefix_len, *,
                     block_sizes: BlockSizes, sm_scale: float | None = None,
                     config: Config = Config(), interpret: bool = False):
  """Block-sparse attention on Hopper, differentiable w.r.t. q, k, v.

  The forward is the Mosaic GPU kernel above; the backward the Mosaic dq and
  dk/dv kernels of mosaic_gpu_backward.py on its lse. Tables without the
  transposed q_ids (tables_from_scores) get them in the backward. kv_len /
  prefix_len None: static full lengths / no prefix (sparse_attention_fwd).
  interpret: run both in the GPU interpreter on the CPU.
  """
  return _attention(q, k, v, tables, kv_len, prefix_len, block_sizes, sm_scale, config,
                    interpret)
