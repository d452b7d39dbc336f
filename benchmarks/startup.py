r"""Where a training process's start-up goes: state init, first batch, trace, lower, compile.

A training process on the H100 spent ~95 s compiling its first step (small at 256 px,
2026-11-25), longer than many of the accuracy recipe's stages train. This times each
phase separately, once per `--attentions` entry (config.model.attention), so a change
of kernel or flag can be judged by its compile time. An entry may repeat: with
JAX_COMPILATION_CACHE_DIR set, the second run of one shows what the persistent cache
saves the later processes of a recipe. startup.json is rewritten after every entry, so
a run cut short keeps what it finished. Timing only: nothing here is a test.

  JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache python benchmarks/startup.py \
      --config=configs/flash.py:small --config.data.image_size=256 \
      --attentions=cudnn,cudnn,auto --out=$OUT
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashmm_jax.data import pipeline  # noqa: E402
from flashmm_jax.training import sharding  # noqa: E402
from flashmm_jax.training import trainer as trainer_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file and variant.')
_ATTENTIONS = flags.DEFINE_list('attentions', ['auto'], 'config.attention values to time')
_OUT = flags.DEFINE_string('out', None, 'folder for startup.json (optional)')
flags.mark_flags_as_required(['config'])


def time_startup(config):
  """Seconds per phase of one trainer's start-up, up to a compiled first step."""
  times, t = {}, time.perf_counter()

  def mark(name):
    nonlocal t
    now = time.perf_counter()
    times[name] = round(now - t, 2)
    t = now
    print(f'  {name}: {times[name]} s', flush=True)

  with tempfile.TemporaryDirectory() as workdir:
    trainer = trainer_lib.Trainer(config, workdir)
    jax.block_until_ready(trainer.params)
    mark('state')
    batches = pipeline.train_batches(config, trainer.tokenizer)
    batch = sharding.global_batch(next(batches), trainer.mesh)
    getattr(batches, 'close', lambda: None)()
    mark('first_batch')
    with sharding.activate(trainer.mesh, config.logical_axis_rules):
      traced = trainer.step_fn.trace(trainer.params, trainer.rest, trainer.opt_state, batch)
      mark('trace')
      lowered = traced.lower()
      mark('lower')
      compiled = lowered.compile()
      mark('compile')
      jax.block_until_ready(compiled(trainer.params, trainer.rest, trainer.opt_state, batch))
      mark('first_run')
  return times


def write(result):
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, 'startup.json'), 'w') as f:
      json.dump(result, f, indent=1)


def main(argv):
  del argv
  result = {'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
            'date': time.strftime('%Y-%m-%d'), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'compilation_cache': os.environ.get('JAX_COMPILATION_CACHE_DIR', ''), 'runs': []}
  for attention in _ATTENTIONS.value:
    print(f'attention={attention}', flush=True)
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.attention = attention
    result['runs'].append({'attention': attention, 'seconds': time_startup(config)})
    write(result)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  app.run(main)
