"""What a task is: a name, how it is scored, and a seeded example generator."""

import dataclasses
from typing import Callable

import numpy as np

METRICS = ('exact', 'caption')


@dataclasses.dataclass(frozen=True)
class Task:
  """A procedurally generated task.

  generate(rng, image_size, split) returns an example dict
  {'image': uint8 [H, W, 3], 'prompt': str, 'answer': str, 'task': str}.
  `split` only matters to tasks with held-out assets (the digit glyphs); the
  randomness is entirely in `rng`.
  """
  name: str
  metric: str
  generate_fn: Callable

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f'Task {self.name!r}: metric must be one of {METRICS}, '
                       f'got {self.metric!r}')

  def generate(self, rng: np.random.Generator, image_size: int, split: str = 'train'):
    image, prompt, answer = self.generate_fn(rng, image_size, split)
    return example(image, prompt, answer, self.name)


def example(image, prompt, answer, task):
  return {'image': image, 'prompt': prompt, 'answer': answer, 'task': task}
