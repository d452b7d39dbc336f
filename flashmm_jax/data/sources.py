"""Where examples come from: index -> example maps for training and the eval split.

Training sees one endless, randomly indexable stream per config: global index
g always yields the same example, which is what makes batches a pure function
of the step. For the suite, every run of len(tasks) consecutive indices holds
each task once in a seeded order; for loaded data, each epoch is a seeded
permutation of the training records.
"""

import numpy as np

from flashmm_jax.data.loaders import LOADERS, LoadedExamples
from flashmm_jax.data.tasks import make_example, resolve_tasks

SOURCES = ('suite',) + tuple(LOADERS)
SOURCE_TASKS = {'vqa_json': 'vqa', 'coco': 'caption'}
# Extra first words of the RNG seeds, distinct from the split ids (0, 1) used
# by make_example, so these streams never coincide with an example's.
NOISE_STREAM, MIX_STREAM, EPOCH_STREAM = 2, 3, 4


class SuiteMixture:
  """Uniform, deterministic mix of suite tasks: each block holds every task once."""

  def __init__(self, tasks, seed, image_size):
    self.tasks, self.seed, self.image_size = tasks, seed, image_size

  def __getitem__(self, index):
    block, slot = divmod(index, len(self.tasks))
    order = np.random.default_rng([self.seed, MIX_STREAM, block]).permutation(len(self.tasks))
    # A task's block-th appearance uses its block-th train example.
    return make_example(self.tasks[order[slot]], 'train', block, self.seed, self.image_size)


class EpochCycle:
  """Loaded examples repeated forever, each epoch in its own seeded order."""

  def __init__(self, examples, seed):
    self.examples, self.seed = examples, seed

  def __getitem__(self, index):
    epoch, position = divmod(index, len(self.examples))
    order = np.random.default_rng([self.seed, EPOCH_STREAM, epoch]).permutation(len(self.examples))
    return self.examples[int(order[position])]


def check_source(config):
  source = config.data.source
  if source not in SOURCES:
    raise ValueError(f'Unknown data source {source!r}; valid: {", ".join(SOURCES)}')
  if source != 'suite' and not config.data.path:
    raise ValueError(f'Data source {source!r} needs config.data.path (a JSON file)')
  return source


def loaded_splits(config):
  """(train, eval) LoadedExamples: the last `eval_examples` records are held out."""
  source = check_source(config)
  loaded = LOADERS[source](config.data.path, config.data.image_size, resize=True)
  n_eval = config.data.eval_examples
  if len(loaded) <= n_eval:
    raise ValueError(f'{config.data.path}: {len(loaded)} records leave none for training '
                     f'after holding out config.data.eval_examples={n_eval}')
  cut = len(loaded) - n_eval
  return tuple(LoadedExamples(loaded.task, records, loaded.image_size, loaded.resize)
               for records in (loaded.records[:cut], loaded.records[cut:]))


def train_source(config):
  """An index -> example map for training under this config."""
  if check_source(config) == 'suite':
    tasks = resolve_tasks(config.data.tasks)
    return SuiteMixture(tasks, config.data.seed, config.data.image_size)
  train, _ = loaded_splits(config)
  return EpochCycle(train, config.data.seed)


def eval_tasks(config):
  """The tasks an eval covers: the selected suite tasks, or the loader's one task."""
  source = check_source(config)
  if source == 'suite':
    return resolve_tasks(config.data.tasks)
  return (SOURCE_TASKS[source],)


def eval_examples(config, task):
  """The fixed eval split of a task: config.data.eval_examples examples."""
  source = check_source(config)
  if source == 'suite':
    resolve_tasks([task])  # validates the name
    return [make_example(task, 'eval', i, config.data.seed, config.data.image_size)
            for i in range(config.data.eval_examples)]
  if task != SOURCE_TASKS[source]:
    raise ValueError(f'Data source {source!r} only has task {SOURCE_TASKS[source]!r}, '
                     f'not {task!r}')
  _, held_out = loaded_splits(config)
  return [held_out[i] for i in range(len(held_out))]
