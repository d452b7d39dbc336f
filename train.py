r"""Trains a model from a config.

  python train.py --config=configs/flash.py:tiny --workdir=/tmp/flash_tiny
  python train.py --config=configs/pro.py:small --workdir=DIR --config.train.total_steps=3000

Rerunning with the same workdir resumes from its latest checkpoint.
"""

import functools
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flashmm_jax import cli
from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.evaluation import runner
from flashmm_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard and results go here.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() for multi-process runs (SLURM, '
    'TPU pod slices). Default: on when SLURM_NTASKS > 1 or JAX_COORDINATOR_ADDRESS is set.')
flags.mark_flags_as_required(['config', 'workdir'])


def multiprocess_requested():
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or 'JAX_COORDINATOR_ADDRESS' in os.environ


@cli.guarded
def main(argv):
  del argv
  if multiprocess_requested():
    jax.distributed.initialize()
  logging.info('JAX %s on %d %s device(s), process %d of %d', jax.__version__,
               jax.device_count(), jax.devices()[0].platform, jax.process_index(),
               jax.process_count())
  config = _CONFIG.value
  trainer.train(config, _WORKDIR.value, eval_fn=functools.partial(suite_accuracy, config))


def suite_accuracy(config, model):
  """The in-training eval hook (every config.train.eval_every steps): task accuracies."""
  results = runner.evaluate(model, config, tokenizer_lib.get_tokenizer(config.data.tokenizer))
  out = {'mean': results['mean'], **{t: r['score'] for t, r in results['tasks'].items()}}
  if 'sparsity' in results:  # a sparse-attention model: its prefill sparsity
    out['sparsity'] = results['sparsity']['sparsity/overall']
  return out


if __name__ == '__main__':
  app.run(main)
