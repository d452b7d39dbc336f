"""Turns examples into the fixed-shape arrays the model and trainer consume.

One example, L = max_text_len:
  image        uint8 [H, W, 3]
  text         int32 [L]  bos, prompt..., answer..., eos, pad (0)...
  prefix_len   int32      1 + len(prompt): bos and prompt attend bidirectionally
  text_len     int32      number of valid (non-pad) tokens
  target_mask  float32 [L] 1.0 at the answer tokens and eos (what is predicted)
  task_id      int32
Batches stack these along a new leading axis.
"""

import numpy as np

from flashmm_jax.data.tasks import task_id

BATCH_KEYS = ('image', 'text', 'prefix_len', 'text_len', 'target_mask', 'task_id')


def encode_example(tokenizer, example, max_text_len, with_answer=True):
  """Tokenizes one example; with_answer=False keeps only bos + prompt (for decoding)."""
  task = example['task']
  prompt = tokenizer.encode(example['prompt'])
  answer = tokenizer.encode(example['answer']) + [tokenizer.eos_id] if with_answer else []
  tokens = [tokenizer.bos_id] + prompt + answer
  if len(tokens) > max_text_len:
    raise ValueError(
        f'Task {task!r}: example needs {len(tokens)} tokens (1 bos + {len(prompt)} prompt '
        f'+ {len(answer)} answer and eos) but max_text_len is {max_text_len}')
  text = np.full(max_text_len, tokenizer.pad_id, np.int32)
  text[:len(tokens)] = tokens
  prefix_len = 1 + len(prompt)
  target_mask = np.zeros(max_text_len, np.float32)
  target_mask[prefix_len:len(tokens)] = 1.0
  return {
      'image': _checked_image(example['image'], task),
      'text': text,
      'prefix_len': np.int32(prefix_len),
      'text_len': np.int32(len(tokens)),
      'target_mask': target_mask,
      'task_id': np.int32(task_id(task)),
  }


def _checked_image(image, task):
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Task {task!r}: image must be uint8 [H, W, 3], '
                     f'got {image.dtype} {image.shape}')
  return image


def stack(encoded):
  """A batch dict from a list of encoded examples (all with the same shapes)."""
  return {key: np.stack([e[key] for e in encoded]) for key in BATCH_KEYS}
