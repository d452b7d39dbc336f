"""Train and eval batch iterators.

Training is a grain MapDataset over example indices: the example at position p
of step k is global index k * global_batch + p, so batch k depends only on the
data config, k and this process's slice, never on where the run (re)started.
Each process takes a contiguous slice of the global batch.

Eval batches hold prompt-only text (the model decodes the answer) plus the
reference `answers` and a `valid` mask; the last batch is padded by repeating
an example, so every batch has the same shapes and compiles once.
"""

import grain
import numpy as np

from flashmm_jax.data import sources, workers
from flashmm_jax.data.corruptions import apply_noise, parse_noise
from flashmm_jax.data.encoding import encode_example, stack
from flashmm_jax.data.tasks import task_id

eval_examples = sources.eval_examples
eval_tasks = sources.eval_tasks

# The endless training stream is a very long finite range: 2**40 examples is
# billions of steps at any batch size.
_STREAM_LENGTH = 2**40
# grain's defaults (16 threads, 500 elements) would build 500 whole batches
# ahead; a couple per process (or per worker) keeps memory and CPU bounded.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def local_batch_size(global_batch, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, process_count='
                     f'{process_count})')
  if global_batch % process_count:
    raise ValueError(f'Global batch size {global_batch} does not divide by '
                     f'process_count {process_count}')
  return global_batch // process_count


class _EncodeTrainExample:
  """Process-local stream position -> encoded example (picklable for workers)."""

  def __init__(self, source, tokenizer, max_text_len, global_batch, local_batch, process_index):
    self.source, self.tokenizer, self.max_text_len = source, tokenizer, max_text_len
    self.global_batch, self.local_batch = global_batch, local_batch
    self.offset = process_index * local_batch

  def __call__(self, local_index):
    step, position = divmod(int(local_index), self.local_batch)
    example = self.source[step * self.global_batch + self.offset + position]
    return encode_example(self.tokenizer, example, self.max_text_len)


def train_batches(config, tokenizer, start_step=0, process_index=0, process_count=1):
  """Batches for steps start_step, start_step + 1, ... (this process's slice)."""
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  global_batch = config.train.batch_size
  local = local_batch_size(global_batch, process_index, process_count)
  encode = _EncodeTrainExample(sources.train_source(config), tokenizer,
                               config.data.max_text_len, global_batch, local, process_index)
  first = start_step * local
  dataset = (grain.MapDataset.range(first, first + _STREAM_LENGTH)
             .map(encode)
             .batch(local, drop_remainder=True, batch_fn=stack))
  stream = dataset.to_iter_dataset(_READ_OPTIONS)
  if config.data.num_workers <= 0:
    return iter(stream)
  return workers.prefetch_in_workers(stream, config.data.num_workers)


def _noisy(example, index, noise, seed):
  """The example with its image corrupted, seeded by its index so evals repeat."""
  if noise is None:
    return example
  name, severity = noise
  rng = np.random.default_rng([seed, sources.NOISE_STREAM, task_id(example['task']), index])
  return dict(example, image=apply_noise(example['image'], name, severity, rng))


def _eval_batch(tokenizer, examples, max_text_len, batch_size):
  """Encodes up to batch_size examples; pads by repeating the last, marked invalid."""
  n = len(examples)
  padded = examples + [examples[-1]] * (batch_size - n)
  batch = stack([encode_example(tokenizer, ex, max_text_len, with_answer=False)
                 for ex in padded])
  batch['answers'] = [ex['answer'] for ex in padded]
  batch['valid'] = np.arange(batch_size) < n
  return batch


def eval_batches(config, tokenizer, task, noise=''):
  """Fixed-shape batches over a task's eval split, optionally corrupted ('name:severity')."""
  corruption = parse_noise(noise)
  examples = eval_examples(config, task)
  batch_size = config.eval.batch_size
  if batch_size < 1:
    raise ValueError(f'config.eval.batch_size must be >= 1, got {batch_size}')
  # Parsing noise and loading examples happen eagerly, so bad arguments fail
  # at the call, not at the first next().
  return _iter_eval_batches(config, tokenizer, examples, corruption, batch_size)


def _iter_eval_batches(config, tokenizer, examples, corruption, batch_size):
  for start in range(0, len(examples), batch_size):
    chunk = [_noisy(ex, start + i, corruption, config.data.seed)
             for i, ex in enumerate(examples[start:start + batch_size])]
    yield _eval_batch(tokenizer, chunk, config.data.max_text_len, batch_size)
