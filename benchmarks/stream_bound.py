"""How fast the GPU streams a decode step's key/value blocks when nothing is
computed on them: the bound the sparse decode kernel's stream works against.

  python benchmarks/stream_bound.py --decode 8x32768 --sparsities 0.65 --out DIR

The decode kernel read its 35% of the cache at ~4.0 TB/s and cuDNN all of it at
~4.4 (docs/results.md); whether that gap is the kernel's (its arithmetic, its
loop), the access pattern's (short, scattered blocks) or the stream's length
is what this answers. `stream` is the decode kernel's CTA and loads without
the arithmetic: CTA (split, kv head, batch) takes the same slice of its row's
list (mosaic_gpu_decode._slice_of), TMA-loads each listed block's K and V into
shared memory, `stages` blocks ahead, and waits for them; it writes out its
slice's last V block (so a test can check what it read). With a trailing `p`
(--streams 1x256p) each CTA first loads its row's pooled keys and waits for
them, as a kernel that selects its own blocks must before its first block:
the least such a kernel adds. The stream kernels (--streams) and the decode
kernel (--decodes), each as STAGESxCTAS, run over four lists of one case
(attention.decode_case) per --sparsities value:

  ranked      the step's own selection (rank order, as the kernel gets it)
  sorted      the same blocks in ascending order
  contiguous  the row's first `budget` blocks
  all         every block (cuDNN's bytes)

and cuDNN's dense decode beside them. Checks first: each stream kernel's
blocks against stream_reference, the decode kernel over `sorted` against it
over `ranked`. Times are CUPTI's kernel durations
(decode_timeline.profiled_kernels), medians over --traced calls in --repeats
rounds that alternate the paths. Writes DIR/stream_bound.{json,md}: per path
each kernel's median us, and the K/V bytes its list holds over the longest
kernel's time. A list that fits the L2 cache (50 MB on an H100 or H200: 35% of
batch 8 x 8k is 48 MB) is read from it in part, call after call, and streams
faster than DRAM does.
"""

import dataclasses
import functools
import os
import statistics
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import decode_timeline  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_decode  # noqa: E402
from pallas_kernels.sparse_attention.mosaic_gpu_backward import _transforms  # noqa: E402

_STREAMS = flags.DEFINE_list('streams', ['1x256', '2x256', '1x512'],
                             'stream kernels as STAGESxCTAS (CTAs: about that many a call), '
                             'a trailing p: each CTA loads its row\'s pooled keys first')
_DECODES = flags.DEFINE_list('decodes', ['1x256'], 'the decode kernel as STAGESxCTAS '
                             '(its defaults: 1x256)')
_LISTS = flags.DEFINE_list('lists', ['ranked', 'sorted', 'contiguous', 'all'],
                           'block lists each kernel reads (see the module doc)')


@dataclasses.dataclass(frozen=True)
class _Static:
  block_k: int
  stages: int
  splits: int
  width: int
  prologue: bool


def _load_pooled(pooled_ref, k_smem, v_smem, k_bar, v_bar, b, h, block_k):
  """The row's pooled keys into the first K and V slots, waited for: what a
  kernel that selects its own blocks reads before its first block."""
  n_k = pooled_ref.shape[1]
  halves = ((0, min(n_k, block_k), k_smem, k_bar), (block_k, n_k - block_k, v_smem, v_bar))
  for first, rows, smem, bar in halves:
    if rows > 0:
      plgpu.copy_gmem_to_smem(pooled_ref.at[b, pl.ds(first, rows), h],
                              smem.at[0, pl.ds(0, rows)], bar.at[0])
  for _, rows, _, bar in halves:
    if rows > 0:
      plgpu.barrier_wait(bar.at[0])


def _kernel(k_ref, v_ref, pooled_ref, ids_ref, count_ref, out_ref, k_smem, v_smem, k_bar,
            v_bar, *, st: _Static):
  b, h, split = (lax.axis_index(a) for a in ('batch', 'head', 'split'))
  r = b * k_ref.shape[2] + h
  lo, n = mosaic_gpu_decode._slice_of(count_ref[r], split, st.splits)
  row = r * st.width
  if st.prologue:
    _load_pooled(pooled_ref, k_smem, v_smem, k_bar, v_bar, b, h, st.block_k)

  def fetch(j, slot):
    @pl.when(j < n)
    def _():
      keys = (b, pl.ds(ids_ref[row + lo + j] * st.block_k, st.block_k), h)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])

  for i in range(st.stages):
    fetch(i, i)

  def step(j, carry):
    slot = lax.rem(j, st.stages)
    plgpu.barrier_wait(k_bar.at[slot])
    plgpu.barrier_wait(v_bar.at[slot])
    fetch(j + st.stages, slot)
    return carry

  lax.fori_loop(0, n, step, 0)

  @pl.when(n > 0)
  def _():
    plgpu.copy_smem_to_gmem(v_smem.at[lax.rem(n - 1, st.stages)], out_ref.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=('block_k', 'stages', 'splits', 'interpret'))
def stream(k_cache, v_cache, kv_ids, kv_count, pooled=None, *, block_k, stages=1, splits=0,
           interpret=False):
  """Loads the listed blocks as mosaic_gpu_decode.sparse_decode does and
  computes nothing: [B, Hkv, splits, block_k, D], each CTA's last V block
  (undefined where its slice is empty). k_cache, v_cache [B, S, Hkv, D];
  kv_ids [B, Hkv, width], kv_count [B, Hkv]; splits 0: the decode kernel's
  default_splits. pooled [B, S / block_k, Hkv, D] (at most 2 x block_k blocks):
  each CTA first loads its row's and waits, as a kernel selecting its own
  blocks from them would (none of its arithmetic)."""
  b, s, hkv, d = k_cache.shape
  if kv_ids.shape[:2] != (b, hkv) or kv_count.shape != (b, hkv) or s % block_k:
    raise ValueError(f'stream: kv_ids {kv_ids.shape} / kv_count {kv_count.shape} must lead '
                     f'with (B, Hkv)={(b, hkv)} and the cache length {s} be a multiple '
                     f'of {block_k=}')
  if pooled is not None and (pooled.shape != (b, s // block_k, hkv, d)
                             or s // block_k > 2 * block_k):
    raise ValueError(f'stream: pooled {pooled.shape} must be {(b, s // block_k, hkv, d)} '
                     f'with at most 2 x {block_k=} blocks')
  if (smem := 2 * stages * block_k * d * k_cache.dtype.itemsize) > mosaic_gpu_decode.SMEM_BYTES:
    raise ValueError(f'stream: stages={stages} of K and V blocks take {smem} bytes of shared '
                     f'memory; there are {mosaic_gpu_decode.SMEM_BYTES}')
  splits = splits or mosaic_gpu_decode.default_splits(b * hkv, kv_ids.shape[-1])
  st = _Static(block_k=block_k, stages=stages, splits=splits, width=kv_ids.shape[-1],
               prologue=pooled is not None)
  ring = lambda: plgpu.SMEM((stages, block_k, d), k_cache.dtype,
                            transforms=_transforms(k_cache.dtype))
  return plgpu.kernel(
      functools.partial(_kernel, st=st),
      out_type=jax.ShapeDtypeStruct((b, hkv, splits, block_k, d), k_cache.dtype),
      scratch_types=(ring(), ring(), plgpu.Barrier(num_barriers=stages),
                     plgpu.Barrier(num_barriers=stages)),
      grid=(splits, hkv, b), grid_names=('split', 'head', 'batch'),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(k_cache, v_cache, k_cache if pooled is None else pooled,   # unread without a prologue
    kv_ids.astype(jnp.int32).reshape(-1),
    kv_count.astype(jnp.int32).reshape(-1))


def filled_slices(kv_count, splits):
  """bool [B, Hkv, splits]: the slices (mosaic_gpu_decode._slice_of's) that
  hold at least one entry of their row's list."""
  count, split = np.asarray(kv_count)[..., None], np.arange(splits)
  return (split + 1) * count // splits > split * count // splits


def stream_reference(k_cache, v_cache, kv_ids, kv_count, *, block_k, splits):
  """What stream returns in the filled slices: each slice's last V block
  (zeros in the others)."""
  del k_cache
  b, _, hkv, d = v_cache.shape
  out = np.zeros((b, hkv, splits, block_k, d), np.float32)
  ids, count = np.asarray(kv_ids), np.asarray(kv_count)
  v = np.asarray(v_cache, np.float32)
  for i, h, split in zip(*np.nonzero(filled_slices(count, splits))):
    kb = ids[i, h, (split + 1) * count[i, h] // splits - 1]
    out[i, h, split] = v[i, kb * block_k:(kb + 1) * block_k, h]
  return out


def block_lists(ranked_ids, count, n_k):
  """{name: (ids, count)} of the module doc's lists, from the step's own."""
  b, hkv, width = ranked_ids.shape
  keep = np.arange(width) < np.asarray(count)[..., None]
  ranked = np.where(keep, np.asarray(ranked_ids), n_k)
  budget = np.asarray(count)
  every = np.broadcast_to(np.arange(n_k, dtype=np.int32), (b, hkv, n_k))
  lists = dict(ranked=(ranked, budget),
               sorted=(np.sort(ranked, axis=-1), budget),
               contiguous=(np.where(keep, np.arange(width), n_k), budget),
               all=(every, np.full((b, hkv), n_k)))
  return {name: (jnp.asarray(np.minimum(ids, n_k - 1), jnp.int32), jnp.asarray(c, jnp.int32))
          for name, (ids, c) in lists.items()}


def _paths(args, budget, method, block_k):
  """{name: (jitted fn, its args, K/V bytes it reads)}."""
  q, kc, vc, pooled, *lens = args
  n_k = kc.shape[1] // block_k
  ids, count = jax.jit(functools.partial(attention.decode_tables, budget=budget,
                                         method=method))(q, pooled)
  block_bytes = 2 * block_k * kc.shape[-1] * kc.dtype.itemsize
  interpret = jax.default_backend() == 'cpu'
  paths = {}
  if jax.default_backend() == 'gpu':
    paths['cudnn'] = (attention.cudnn_decode_step, args, 2 * kc.size * kc.dtype.itemsize)
  for name in _LISTS.value:
    lids, lcount = block_lists(ids, count, n_k)[name]
    nbytes = int(np.asarray(lcount).sum()) * block_bytes
    for kind, specs in (('decode', _DECODES.value), ('stream', _STREAMS.value)):
      for spec in specs:
        stages, ctas = map(int, spec.removesuffix('p').split('x'))
        splits = mosaic_gpu_decode.default_splits(lcount.size, lids.shape[-1], ctas)
        if kind == 'decode':
          fn = functools.partial(mosaic_gpu_decode.sparse_decode, block_k=block_k,
                                 num_splits=splits, num_stages=stages, interpret=interpret)
          fn_args = (q, kc, vc, lids, lcount, *lens)
        else:
          fn = functools.partial(stream, block_k=block_k, stages=stages, splits=splits,
                                 interpret=interpret)
          fn_args = (kc, vc, lids, lcount) + ((pooled,) if spec.endswith('p') else ())
        paths[f'{kind}_{spec}_{name}'] = (jax.jit(fn), fn_args, nbytes)
  return paths


def check(paths, block_k):
  """The stream kernels' blocks against stream_reference (where a slice is
  not empty: bit for bit), and the decode kernel over the sorted list against
  it over the ranked one (the same blocks, another order): {name: error}."""
  errors = {}
  for name, (fn, fn_args, _) in paths.items():
    if name.startswith('stream_'):
      got = np.asarray(fn(*fn_args), np.float32)
      want = stream_reference(*fn_args[:4], block_k=block_k, splits=got.shape[2])
      filled = filled_slices(fn_args[3], got.shape[2])
      errors[name] = float(np.abs(got - want)[filled].max())
    elif name.startswith('decode_') and name.endswith('_sorted'):
      ranked = name.removesuffix('_sorted') + '_ranked'
      if ranked in paths:
        errors[name] = attention.rel_err(fn(*fn_args), paths[ranked][0](*paths[ranked][1]))
  return errors


def bench(batch, cache, sparsity=0.65):
  args, budget, method = attention.decode_case(batch, cache, sparsity=sparsity)
  block_k = attention._DECODE_BLOCK_K.value
  paths = _paths(args, budget, method, block_k)
  errors = check(paths, block_k)
  print(errors)
  if bad := {n: e for n, e in errors.items() if e > (2e-2 if n.startswith('decode') else 0)}:
    raise AssertionError(f'stream_bound: outputs off their references: {bad}')
  kernels = {name: {} for name in paths}
  # A CPU run (a smoke test of the checks) has no GPU kernels to time.
  for _ in range(attention._REPEATS.value if jax.default_backend() == 'gpu' else 0):
    for name, (fn, fn_args, _) in paths.items():
      for call in decode_timeline.trace(fn, fn_args, decode_timeline._TRACED.value):
        for _, duration, kernel in call:
          kernels[name].setdefault(kernel, []).append(duration / 1e3)
  row = dict(batch=batch, cache=cache, sparsity=sparsity, block_k=block_k, budget=budget,
             select=method, errors=errors, paths={})
  for name, (_, _, nbytes) in paths.items():
    us = {k: statistics.median(d) for k, d in kernels[name].items()}
    longest = max(us.values()) if us else float('nan')
    row['paths'][name] = dict(kernels=us, bytes=nbytes, longest_us=longest,
                              tb_per_s=nbytes / longest / 1e6)
  print(row)
  return row


def markdown(rows, env):
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: K/V blocks of "
           f"{rows[0]['block_k']} keys streamed with and without the decode's arithmetic; "
           "CUPTI kernel durations, medians; TB/s = the list's K/V bytes over the longest "
           "kernel", '',
           '| batch x cache | sparsity | path | MB read | longest kernel (us) | TB/s '
           '| other kernels (us) |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    for name, p in r['paths'].items():
      rest = ', '.join(f'{u:.1f}' for u in sorted(p['kernels'].values())[:-1])
      lines.append(f"| {r['batch']} x {r['cache']} | {r['sparsity']:g} | {name} "
                   f"| {p['bytes'] / 1e6:.0f} "
                   f"| {p['longest_us']:.2f} | {p['tb_per_s']:.2f} | {rest} |")
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('stream_bound', [
      bench(*shape, float(sparsity)) for shape in attention.decode_shapes()
      for sparsity in attention._SPARSITIES.value], markdown)


if __name__ == '__main__':
  app.run(main)
