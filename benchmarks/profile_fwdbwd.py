"""Kernels of one forward + backward step, under Nsight Compute.

At 16k tokens our 65%-sparse forward + backward takes 0.49x of cuDNN's dense
one end to end (docs/results.md) against a 0.45x target, and the kernel
timings alone do not say where the rest goes: selection, the transposed
tables, delta = rowsum(dO * O), the two backward kernels, casts. This runs
one `jax.grad` step of each path of --fwdbwd_paths (compiled and warmed up outside
the profiled range), the same step benchmarks/attention.py times (with its first
--cotangents protocol):

  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for p in cudnn s65; do
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
      -o $OUT/$p python benchmarks/profile_fwdbwd.py --fwdbwd_paths $p
    ncu -i $OUT/$p.ncu-rep --page details --csv > $OUT/$p.csv
  done
  python benchmarks/ncu_summary.py $OUT/fwdbwd_profile cudnn=$OUT/cudnn.csv s65=$OUT/s65.csv

--fwdbwd_paths: cudnn (dense, causal), dense (ours with every tile listed), s65 (ours
at 65% block sparsity, selection inside); --fwdbwd_bwd: our backward's Config;
--forward_only: the forward alone (e.g. with attention.py's --select_method fused,
to see the selection's kernels beside the attention kernel).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import profile_decode  # noqa: E402

_SEQ = flags.DEFINE_integer('seq', 16384, 'sequence length (batch: --tokens // seq)')
_BLOCK_K_FB = flags.DEFINE_integer('fwdbwd_block_k', 64, 'key block of the tables')
PATHS = ('cudnn', 'dense', 's65')
_PATHS_FB = flags.DEFINE_multi_enum('fwdbwd_paths', list(PATHS), PATHS, 'the paths to profile')
_BWD = flags.DEFINE_string('fwdbwd_bwd', '2x2', 'our backward\'s config, a --bwd_configs spec '
                           '(attention.bwd_config, e.g. 2x2xsink_first)')
_FWD_ONLY = flags.DEFINE_bool('forward_only', False, 'profile the forward alone (selection '
                              'inside, by attention.py\'s first --select_method)')
_CTAS = flags.DEFINE_integer('persistent_ctas', 0, 'our forward\'s persistent CTAs (0: one a tile)')


def main(_):
  seq, bk = _SEQ.value, _BLOCK_K_FB.value
  q, k, v = attention.make_inputs(seq)
  ours = lambda keep: attention.sparse_fn(keep, seq, 0, bk, 2, impl='mosaic_vjp',
                                         backward=attention.bwd_config(_BWD.value),
                                         persistent_ctas=_CTAS.value)[0]
  fns = {'cudnn': lambda: attention.dense_baselines()['cudnn'],
         'dense': lambda: ours(1.0), 's65': lambda: ours(0.35)}
  if _FWD_ONLY.value:
    step, args = (lambda fn: fn), (q, k, v)
  else:   # attention.py's first --cotangents protocol
    cotangent = attention._COTANGENTS.value[0]
    step = lambda fn: attention.grad_fn(fn, cotangent)
    args = (q, k, v, attention.random_cotangent(q))
  profile_decode.run_profiled({name: (step(fns[name]()), args) for name in _PATHS_FB.value})


if __name__ == '__main__':
  app.run(main)
