r"""Restores a checkpoint and scores the 12-task suite.

  python eval.py --config=configs/flash.py:tiny --workdir=/tmp/flash_tiny
  python eval.py --config=... --workdir=DIR --noise=gaussian:3
  python eval.py --config=... --workdir=DIR --checkpoint=DIR/checkpoints/300

Writes DIR/eval/results.json and results.md (suffixed with the noise, if any).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flashmm_jax import cli
from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.evaluation import runner
from flashmm_jax.training import sharding
from flashmm_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir; results go to WORKDIR/eval.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint step directory; default: latest in --workdir.')
_NOISE = flags.DEFINE_string('noise', None, 'Corruption NAME:SEVERITY, e.g. gaussian:3.')
flags.mark_flags_as_required(['config', 'workdir'])


@cli.guarded
def main(argv):
  del argv
  config = _CONFIG.value
  noise = config.eval.noise if _NOISE.value is None else _NOISE.value
  mesh = sharding.make_mesh(config.mesh)
  model, step, _ = train_state.restore_model(config, _CHECKPOINT.value or _WORKDIR.value, mesh)
  tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer)
  put = lambda batch: sharding.global_batch(batch, mesh)
  with sharding.activate(mesh, config.logical_axis_rules):
    results = runner.evaluate(model, config, tokenizer, noise=noise, put=put)
  results['step'] = step
  path = runner.write_results(results, f'{_WORKDIR.value}/eval', noise)
  print(runner.results_markdown(results, f'Eval at step {step}' + (f', noise {noise}' if noise else '')))
  logging.info('Wrote %s', path)


if __name__ == '__main__':
  app.run(main)
