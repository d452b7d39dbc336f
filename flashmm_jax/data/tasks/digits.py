"""Tasks on handwritten digit glyphs: reading a number and digit arithmetic.

Glyphs are scikit-learn's bundled 8x8 digits (1797 samples). Train examples
draw from the even-indexed samples and eval examples from the odd ones, so eval
measures reading unseen handwriting rather than recalling a glyph.
"""

import functools

import numpy as np

from flashmm_jax.data import scene
from flashmm_jax.data.tasks.base import Task

GLYPH_FRACTION = 0.8  # glyph side as a fraction of its cell
INK = (240, 240, 240)


@functools.cache
def _glyph_sets():
  """{split: tuple of 10 arrays [n, 8, 8] in [0, 1], one per digit}."""
  from sklearn.datasets import load_digits  # slow import; only digit tasks need it
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  parity = np.arange(len(images)) % 2
  sets = {}
  for split, keep in (('train', 0), ('eval', 1)):
    sets[split] = tuple(images[(digits.target == d) & (parity == keep)] for d in range(10))
  return sets


def glyph(rng, digit, split):
  if split not in ('train', 'eval'):
    raise ValueError(f"Unknown split {split!r}; valid: ('train', 'eval')")
  samples = _glyph_sets()[split][digit]
  return samples[int(rng.integers(len(samples)))]


def render_digits(rng, digits, image_size, split):
  """Digits left to right in consecutive cells of one random grid row."""
  scene.check_image_size(image_size)
  if not 1 <= len(digits) <= scene.GRID:
    raise ValueError(f'Can draw 1 to {scene.GRID} digits in a row, got {len(digits)}')
  image = scene.blank(image_size)
  row = int(rng.integers(scene.GRID))
  first_col = int(rng.integers(scene.GRID - len(digits) + 1))
  for offset, digit in enumerate(digits):
    box = scene.cell_box(image_size, row, first_col + offset)
    scene.paint_glyph(image, glyph(rng, digit, split), scene.inner_box(box, GLYPH_FRACTION, rng), INK)
  return image


def read_digits(rng, image_size, split):
  n = int(rng.integers(2, 4))
  digits = [int(d) for d in rng.integers(0, 10, size=n)]
  answer = ''.join(str(d) for d in digits)
  return render_digits(rng, digits, image_size, split), 'what number is written?', answer


_OPERATIONS = {
    'sum': lambda a, b: a + b,
    'difference': lambda a, b: abs(a - b),  # unsigned, so answers stay digits
    'product': lambda a, b: a * b,
}


def arithmetic(rng, image_size, split):
  op = scene.choice(rng, tuple(_OPERATIONS))
  a, b = (int(d) for d in rng.integers(0, 10, size=2))
  prompt = f'what is the {op} of the digits?'
  return render_digits(rng, [a, b], image_size, split), prompt, str(_OPERATIONS[op](a, b))


TASKS = (
    Task('read_digits', 'exact', read_digits),
    Task('arithmetic', 'exact', arithmetic),
)
