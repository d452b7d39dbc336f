"""The 12-task suite: registry, task ids and deterministic example generation.

task_id is the index in TASK_NAMES. Data brought through the real-format
loaders uses 'caption' (same id as the suite's) or 'vqa', which gets the next
id after the suite, so per-task tables never mix the two.
"""

import numpy as np

from flashmm_jax.data.tasks import chart, ct, describe, digits, text, vqa
from flashmm_jax.data.tasks.base import METRICS, Task, example

TASK_NAMES = (
    'vqa_color', 'vqa_shape', 'vqa_count', 'vqa_spatial', 'vqa_compare',
    'caption', 'read_digits', 'arithmetic', 'chart_read', 'grounding',
    'ct_lesion', 'text_reasoning',
)
# Tasks that only come from loaders, with their metrics ('caption' is shared).
EXTERNAL_TASKS = {'vqa': 'exact'}
EXTERNAL_TASK_NAMES = tuple(EXTERNAL_TASKS)
SPLITS = {'train': 0, 'eval': 1}

_ALL = vqa.TASKS + describe.TASKS + digits.TASKS + chart.TASKS + ct.TASKS + text.TASKS
TASKS = {t.name: t for t in _ALL}
assert tuple(sorted(TASKS)) == tuple(sorted(TASK_NAMES)), 'registry and TASK_NAMES disagree'


def get_task(name):
  if name not in TASKS:
    raise ValueError(f'Unknown task {name!r}; valid: {", ".join(TASK_NAMES)}')
  return TASKS[name]


def task_id(name):
  """Index in TASK_NAMES, or after it for loader-only tasks like 'vqa'."""
  if name in TASK_NAMES:
    return TASK_NAMES.index(name)
  if name in EXTERNAL_TASK_NAMES:
    return len(TASK_NAMES) + EXTERNAL_TASK_NAMES.index(name)
  raise ValueError(f'Unknown task {name!r}; valid: '
                   f'{", ".join(TASK_NAMES + EXTERNAL_TASK_NAMES)}')


def task_metric(name):
  """'exact' or 'caption', for suite and loader-only tasks alike."""
  if name in EXTERNAL_TASKS:
    return EXTERNAL_TASKS[name]
  return get_task(name).metric


def resolve_tasks(names):
  """Validates a task selection; empty means the whole suite, in suite order."""
  if isinstance(names, str):
    names = [n for n in names.split(',') if n]
  names = tuple(names) or TASK_NAMES
  for name in names:
    get_task(name)
  if len(set(names)) != len(names):
    raise ValueError(f'Task list has duplicates: {names}')
  return names


def split_id(split):
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {tuple(SPLITS)}')
  return SPLITS[split]


def example_rng(task_name, split, index, seed):
  return np.random.default_rng([seed, split_id(split), task_id(task_name), index])


def make_example(task_name, split, index, seed, image_size):
  """Example number `index` of a task's split; regenerable alone from its arguments."""
  if index < 0:
    raise ValueError(f'Example index must be >= 0, got {index}')
  task = get_task(task_name)
  return task.generate(example_rng(task_name, split, index, seed), image_size, split)


__all__ = [
    'EXTERNAL_TASK_NAMES', 'METRICS', 'SPLITS', 'TASKS', 'TASK_NAMES', 'Task',
    'example', 'example_rng', 'get_task', 'make_example', 'resolve_tasks',
    'split_id', 'task_id', 'task_metric',
]
