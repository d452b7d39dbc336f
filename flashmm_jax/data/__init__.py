"""Data for flashmm_jax: the 12-task procedural suite, tokenizers and batches.

  tasks/        the suite: TASK_NAMES, make_example(task, split, index, seed, size)
  scene.py      shared rendering of grid scenes, shapes, colours and glyphs
  corruptions   gaussian / blur / occlusion / contrast at severities 1-5
  tokenizer     get_tokenizer('suite' | 'bytes' | path.model)
  encoding      encode_example: the fixed-shape batch contract
  sources       index -> example maps for training and the eval split
  pipeline      train_batches (grain) and eval_batches
  workers       grain worker processes with clean shutdown
  loaders       VQA-style JSON and COCO captions from disk

The names below are imported on first use, so using the tasks alone does not
start grain, and `python -m flashmm_jax.data.tokenizer` runs without the
package having imported that module already (which runpy warns about).
"""

import importlib

_EXPORTS = {
    'apply_noise': 'corruptions', 'parse_noise': 'corruptions',
    'BATCH_KEYS': 'encoding', 'encode_example': 'encoding',
    'load_coco_captions': 'loaders', 'load_vqa_json': 'loaders', 'read_image': 'loaders',
    'eval_batches': 'pipeline', 'eval_examples': 'pipeline', 'eval_tasks': 'pipeline',
    'train_batches': 'pipeline',
    'EXTERNAL_TASK_NAMES': 'tasks', 'TASK_NAMES': 'tasks', 'TASKS': 'tasks',
    'get_task': 'tasks', 'make_example': 'tasks', 'task_id': 'tasks',
    'task_metric': 'tasks',
    'get_tokenizer': 'tokenizer',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module = importlib.import_module(f'{__name__}.{_EXPORTS[name]}')
  return getattr(module, name)


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
