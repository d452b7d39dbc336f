r"""Copies a checkpoint's params alone, cast to a smaller dtype, into a new workdir.

  python scripts/export_params.py --src=WORKDIR --dst=/tmp/dense_bf16 [--dtype=bfloat16]

The copy is what `--config.train.init_from` and eval.py need (not a resume
point): a `small` model is ~35 MB in bf16 instead of ~210 MB with f32 params
and Adam state, so it can leave one machine and be carried to the next
(benchmarks/ship_params.sh).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashmm_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from flashmm_jax.training import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

_SRC = flags.DEFINE_string('src', None, 'Training workdir (latest step) or a step directory.')
_DST = flags.DEFINE_string('dst', None, 'New workdir for the params-only checkpoint.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float16', 'float32'],
                           'dtype of the floating params in the copy.')
flags.mark_flags_as_required(['src', 'dst'])


@cli.guarded
def main(argv):
  del argv
  step = checkpoint.export_params(_SRC.value, _DST.value, _DTYPE.value)
  print(f'step {step} of {_SRC.value} -> {_DST.value} ({_DTYPE.value} params)')


if __name__ == '__main__':
  app.run(main)
