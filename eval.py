r"""Restores a checkpoint and scores the 12-task suite.

  python eval.py --config=configs/flash.py:tiny --workdir=/tmp/flash_tiny
  python eval.py --config=... --workdir=DIR --noise=gaussian:3
  python eval.py --config=... --workdir=DIR --checkpoint=DIR/checkpoints/300

  python eval.py --config=configs/flash.py:small,sparse --workdir=DIR \
      --sweep=threshold=0,coverage=0.9 --sweep=threshold=0,coverage=0.95

Writes DIR/eval/results.json and results.md (suffixed with the noise, if any).
Each --sweep is one setting of the sparse gate's selection rule (keys of
gate.SELECTION_KEYS) scored with the same trained gate; its results go to
DIR/eval/<setting>/, e.g. DIR/eval/threshold0.0_coverage0.9/. Threshold and
coverage are the gate's state, so settings that differ only in their values share
one compiled decoder; a new top_k (the tables' width) compiles anew.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flashmm_jax import cli
from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.evaluation import runner
from flashmm_jax.models import gate
from flashmm_jax.training import sharding
from flashmm_jax.training import train_state

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and variant.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir; results go to WORKDIR/eval.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'A checkpoint step directory; default: latest in --workdir.')
_NOISE = flags.DEFINE_string('noise', None, 'Corruption NAME:SEVERITY, e.g. gaussian:3.')
_SWEEP = flags.DEFINE_multi_string(
    'sweep', [], 'A sparse selection rule to score instead of the config\'s, e.g. '
    '"threshold=0,coverage=0.9"; repeat the flag for more settings.')
_OUT = flags.DEFINE_string('out', None, 'Results directory; default WORKDIR/eval.')
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
  settings = [gate.parse_rule(s, flag='--sweep') for s in _SWEEP.value] or [None]
  if settings != [None] and not gate.gates(model):
    raise ValueError('--sweep needs a model with a sparse gate (config.model.sparse.enabled)')
  for rule in settings:
    out_dir = _OUT.value or f'{_WORKDIR.value}/eval'
    if rule is not None:
      gate.set_selection(model, **rule)
      out_dir += '/' + gate.rule_name(rule)
    with sharding.activate(mesh, config.logical_axis_rules):
      results = runner.evaluate(model, config, tokenizer, noise=noise, put=put)
    results['step'] = step
    path = runner.write_results(results, out_dir, noise)
    title = f'Eval at step {step}' + (f', noise {noise}' if noise else '')
    print(runner.results_markdown(results, title + (f', {rule}' if rule else '')))
    logging.info('Wrote %s', path)


if __name__ == '__main__':
  app.run(main)
