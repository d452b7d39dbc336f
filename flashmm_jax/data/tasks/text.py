"""Text-only reasoning on a blank image: orderings and word arithmetic.

The image carries no information, so these examples check that the language
side still reasons when the vision side has nothing to say.
"""

from flashmm_jax.data import scene
from flashmm_jax.data.tasks.base import Task

NAMES = ('ann', 'bob', 'cy', 'dan', 'eve', 'fay', 'gus', 'hal')
# comparative, superlative of the first in the chain, superlative of the last
SCALES = (
    ('taller', 'tallest', 'shortest'),
    ('older', 'oldest', 'youngest'),
    ('faster', 'fastest', 'slowest'),
)
THINGS = ('apples', 'pens', 'cards', 'coins')


def _ordering(rng):
  """a > b > c stated in shuffled order; asks for either end of the chain."""
  a, b, c = (NAMES[i] for i in rng.permutation(len(NAMES))[:3])
  comparative, top, bottom = scene.choice(rng, SCALES)
  facts = [f'{a} is {comparative} than {b}.', f'{b} is {comparative} than {c}.']
  if rng.integers(2):
    facts.reverse()
  ask_top = bool(rng.integers(2))
  question = f'who is {top if ask_top else bottom}?'
  return ' '.join(facts + [question]), a if ask_top else c


def _word_arithmetic(rng):
  name, things = scene.choice(rng, NAMES), scene.choice(rng, THINGS)
  have = int(rng.integers(1, 10))
  if rng.integers(2):
    change = int(rng.integers(1, 10))
    story, total = f'{name} has {have} {things} and gets {change} more.', have + change
  else:
    change = int(rng.integers(0, have + 1))
    story, total = f'{name} has {have} {things} and gives away {change}.', have - change
  return f'{story} how many {things} does {name} have now?', str(total)


def text_reasoning(rng, image_size, split):
  scene.check_image_size(image_size)
  prompt, answer = (_ordering if rng.integers(2) else _word_arithmetic)(rng)
  return scene.blank(image_size, (0, 0, 0)), prompt, answer


TASKS = (Task('text_reasoning', 'exact', text_reasoning),)
