"""Tasks that name objects and where they are: captions and grounding to a cell."""

from flashmm_jax.data import scene
from flashmm_jax.data.scene import Obj
from flashmm_jax.data.tasks.base import Task

MAX_CAPTION_OBJECTS = 4  # keeps a caption within 12 suite tokens


def caption_items(text):
  """The (colour, shape) items of a caption, e.g. 'red circle, blue square'.

  Scoring is set F1 over these, so order and duplicates do not matter; a
  malformed item is kept whole so it counts as a false positive.
  """
  items = set()
  for part in text.split(','):
    words = tuple(part.split())
    if words:
      items.add(words)
  return items


def caption(rng, image_size, split):
  n = int(rng.integers(1, MAX_CAPTION_OBJECTS + 1))
  pairs = scene.sample_pairs(rng, n)
  cells = sorted(scene.sample_cells(rng, n))  # row-major = reading order
  objects = [Obj(c, s, r, k, scene.sample_scale(rng)) for (c, s), (r, k) in zip(pairs, cells)]
  answer = ', '.join(o.name for o in objects)
  return scene.render_scene(objects, image_size, rng), 'list the objects in reading order.', answer


def grounding(rng, image_size, split):
  n = int(rng.integers(2, 6))
  target_cell = (int(rng.integers(scene.GRID)), int(rng.integers(scene.GRID)))
  cells = [target_cell] + scene.sample_cells(rng, n - 1, exclude=(target_cell,))
  pairs = scene.sample_pairs(rng, n)
  objects = [Obj(c, s, r, k, scene.sample_scale(rng)) for (c, s), (r, k) in zip(pairs, cells)]
  prompt = f'which cell holds the {objects[0].name}?'
  answer = f'row {target_cell[0] + 1} col {target_cell[1] + 1}'
  return scene.render_scene(objects, image_size, rng), prompt, answer


TASKS = (
    Task('caption', 'caption', caption),
    Task('grounding', 'exact', grounding),
)
