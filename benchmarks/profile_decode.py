"""Hardware counters of one sparse decode step's kernels, under Nsight Compute.

Timed end to end, the sparse decode steps read the selected 35% of the cache at
~2.1-2.3 TB/s against cuDNN's 3.66 over all of it (docs/results.md); the counters
tell a kernel's own time and bandwidth from the glue around it. This runs each
path of --paths once, after compiling and warming up outside the profiled range,
so `ncu --profile-from-start off` sees only the kernels of one step. One ncu run
a path keeps each path's kernels in its own report; then benchmarks/ncu_summary.py
tabulates them (duration, DRAM throughput, occupancy):

  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # else ncu saves all of JAX's pool a pass
  for p in cudnn tables fused mosaic; do
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
      --section WarpStateStats --section SchedulerStats -o $OUT/$p \\
      python benchmarks/profile_decode.py --paths $p
    ncu -i $OUT/$p.ncu-rep --page details --csv > $OUT/$p.csv
  done
  python benchmarks/ncu_summary.py $OUT/decode_profile cudnn=$OUT/cudnn.csv \\
    tables=$OUT/tables.csv fused=$OUT/fused.csv mosaic=$OUT/mosaic.csv

Paths: cudnn (dense decode), tables (the Triton table kernel), fused (the Triton
kernel with the selection fused in), mosaic (the Mosaic kernel, --mosaic
SPLITSxSTAGES). Tables and scores are made outside the profiled range, as the
`_kernel` timings of benchmarks/attention.py make them; the glue a kernel needs
around it (tiles, split tables, the splits' merge) is inside. mosaic_step: the
whole step, the selection (attention.decode_tables by
attention.decode_select_methods' first) inside too.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from pallas_kernels.sparse_attention import decode  # noqa: E402

_BATCH = flags.DEFINE_integer('batch', 8, 'sequences')
_CACHE = flags.DEFINE_integer('cache', 32768, 'cached positions per sequence')
_SPARSITY = flags.DEFINE_float('sparsity', 0.65, 'share of key blocks skipped')
_MOSAIC = flags.DEFINE_string('mosaic', '0x1', 'Mosaic decode SPLITSxSTAGES')
PATHS = ('cudnn', 'tables', 'fused', 'mosaic', 'mosaic_step')
_PATHS = flags.DEFINE_multi_enum('paths', list(PATHS), PATHS, 'the paths to profile')


def _cudart():
  """The CUDA runtime JAX loaded (cudaProfilerStart/Stop bound ncu's range)."""
  names = [ctypes.util.find_library('cudart')]
  for path in sys.path:
    names += sorted(glob.glob(os.path.join(path, 'nvidia', 'cu*', 'lib', 'libcudart.so*')))
    names += sorted(glob.glob(os.path.join(path, 'nvidia', 'cuda_runtime', 'lib',
                                           'libcudart.so*')))
  for name in filter(None, names):
    try:
      return ctypes.CDLL(name)
    except OSError:
      continue
  raise RuntimeError('no libcudart found to start the profiled range')


def run_profiled(paths):
  """Runs each (fn, args) of paths once inside the profiled range, after
  compiling and warming it up outside, so ncu sees one step of each."""
  for fn, args in paths.values():
    jax.block_until_ready(fn(*args))
  lib = _cudart()
  lib.cudaProfilerStart()
  for name, (fn, args) in paths.items():
    print(f'== {name}', flush=True)
    jax.block_until_ready(fn(*args))
  lib.cudaProfilerStop()


def main(_):
  b, s, bk = _BATCH.value, _CACHE.value, attention._DECODE_BLOCK_K.value
  step_args, budget, method = attention.decode_case(b, s, bk, _SPARSITY.value)
  q, kc, vc, pooled, *lens = step_args
  kv_len, n_k = lens[0], s // bk
  ids, count = attention.decode_tables(q, pooled, budget)
  scores = attention.decode_scores(q, pooled)
  cutoff = jnp.full(scores.shape[:-1], budget - 2, jnp.int32)
  mosaic = attention.mosaic_decode_kernel(_MOSAIC.value, bk)
  paths = {
      'cudnn': (attention.cudnn_decode, (q, kc, vc, kv_len)),
      'tables': (jax.jit(lambda q, k, v, i, c, *lens: decode.sparse_decode(
          q, k, v, i, c, *lens, block_k=bk)), (q, kc, vc, ids, count, *lens)),
      'fused': (jax.jit(lambda q, k, v, sc, cu, *lens: decode.sparse_decode_scored(
          q, k, v, sc, cu, *lens, block_k=bk, rule='top_k')),
                (q, kc, vc, scores, cutoff, *lens)),
      'mosaic': (mosaic, (q, kc, vc, ids, count, *lens)),
      'mosaic_step': (attention.mosaic_decode_step(
          budget, method, bk, **attention.decode_config(_MOSAIC.value)), step_args),
  }
  run_profiled({name: paths[name] for name in _PATHS.value})
  cache_mb = 2 * kc.size * kc.dtype.itemsize / 1e6   # K and V
  print(f'kept {count[0, 0]} of {n_k} key blocks per row; K/V bytes read by the sparse '
        f'paths: {cache_mb * int(count[0, 0]) / n_k:.0f} MB, by cuDNN {cache_mb:.0f} MB')


if __name__ == '__main__':
  app.run(main)
