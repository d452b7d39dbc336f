"""Visual question answering about grid scenes: colour, shape, count, space, compare.

Each generator first draws the answer uniformly (or yes/no 50/50), then builds
a scene consistent with it, so a model cannot win by guessing the prior.
"""

from flashmm_jax.data import scene
from flashmm_jax.data.scene import COLOUR_NAMES, SHAPES, Obj
from flashmm_jax.data.tasks.base import Task


def _objects(rng, pairs, cells, scales=None):
  scales = scales or [scene.sample_scale(rng) for _ in pairs]
  return [Obj(c, s, r, k, sc) for (c, s), (r, k), sc in zip(pairs, cells, scales)]


def vqa_color(rng, image_size, split):
  n = int(rng.integers(1, 5))
  shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
  colours = [scene.choice(rng, COLOUR_NAMES) for _ in range(n)]
  objects = _objects(rng, list(zip(colours, shapes)), scene.sample_cells(rng, n))
  prompt = f'what colour is the {shapes[0]}?'
  return scene.render_scene(objects, image_size, rng), prompt, colours[0]


def vqa_shape(rng, image_size, split):
  n = int(rng.integers(1, 5))
  colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:n]]
  shapes = [scene.choice(rng, SHAPES) for _ in range(n)]
  objects = _objects(rng, list(zip(colours, shapes)), scene.sample_cells(rng, n))
  prompt = f'what shape is the {colours[0]} object?'
  return scene.render_scene(objects, image_size, rng), prompt, shapes[0]


def _count_pairs(rng, k, counted):
  """k objects with the `counted` colour or shape, plus 0-3 without it."""
  is_colour = counted in COLOUR_NAMES
  keyed_values, free_values = (COLOUR_NAMES, SHAPES) if is_colour else (SHAPES, COLOUR_NAMES)
  others = [v for v in keyed_values if v != counted]
  keyed = [counted] * k + [scene.choice(rng, others) for _ in range(rng.integers(0, 4))]
  free = [scene.choice(rng, free_values) for _ in keyed]
  return list(zip(keyed, free)) if is_colour else list(zip(free, keyed))


def vqa_count(rng, image_size, split):
  kind = scene.choice(rng, ('colour', 'shape', 'all'))
  if kind == 'all':
    k = int(rng.integers(1, 7))
    pairs = [(scene.choice(rng, COLOUR_NAMES), scene.choice(rng, SHAPES))
             for _ in range(k)]
    prompt = 'how many objects are there?'
  elif kind == 'colour':
    k = int(rng.integers(0, 5))
    target = scene.choice(rng, COLOUR_NAMES)
    pairs = _count_pairs(rng, k, target)
    prompt = f'how many {target} objects are there?'
  else:
    k = int(rng.integers(0, 5))
    target = scene.choice(rng, SHAPES)
    pairs = _count_pairs(rng, k, target)
    prompt = f'how many {scene.PLURALS[target]} are there?'
  objects = _objects(rng, pairs, scene.sample_cells(rng, len(pairs)))
  return scene.render_scene(objects, image_size, rng), prompt, str(k)


# relation -> (axis: 0 = rows, 1 = columns; sign: +1 when X has the smaller index)
_RELATIONS = {'left': (1, 1), 'right': (1, -1), 'above': (0, 1), 'below': (0, -1)}
_PHRASES = {'left': 'left of', 'right': 'right of', 'above': 'above', 'below': 'below'}


def _two_cells_apart(rng, axis, x_first, same_line):
  """Cells for X and Y differing along `axis`; X has the smaller index iff x_first."""
  lo, hi = sorted(int(i) for i in rng.choice(scene.GRID, size=2, replace=False))
  line_x = int(rng.integers(scene.GRID))
  line_y = line_x if same_line else int(rng.integers(scene.GRID))
  ix, iy = (lo, hi) if x_first else (hi, lo)
  if axis == 1:
    return (line_x, ix), (line_y, iy)
  return (ix, line_x), (iy, line_y)


def vqa_spatial(rng, image_size, split):
  relation = scene.choice(rng, tuple(_RELATIONS))
  axis, sign = _RELATIONS[relation]
  ask_where = bool(rng.integers(2))
  if ask_where:
    # Same row or column, so exactly one of the four words is true.
    cell_x, cell_y = _two_cells_apart(rng, axis, sign > 0, same_line=True)
  else:
    truth = bool(rng.integers(2))
    cell_x, cell_y = _two_cells_apart(rng, axis, (sign > 0) == truth, same_line=False)
  extra = int(rng.integers(0, 3))
  pairs = scene.sample_pairs(rng, 2 + extra)
  cells = [cell_x, cell_y] + scene.sample_cells(rng, extra, exclude=(cell_x, cell_y))
  objects = _objects(rng, pairs, cells)
  x, y = objects[0].name, objects[1].name
  if ask_where:
    prompt, answer = f'where is the {x} relative to the {y}?', relation
  else:
    prompt = f'is the {x} {_PHRASES[relation]} the {y}?'
    answer = 'yes' if truth else 'no'
  return scene.render_scene(objects, image_size, rng), prompt, answer


# Count pairs (nx, ny) for "more X than Y?", split by answer and sampled
# uniformly within each half so yes/no is exactly 50/50.
_MORE_YES = [(a, b) for a in range(5) for b in range(5) if a > b]
_MORE_NO = [(a, b) for a in range(5) for b in range(5) if a <= b]


def _compare_counts(rng):
  truth = bool(rng.integers(2))
  nx, ny = scene.choice(rng, _MORE_YES if truth else _MORE_NO)
  cx, cy = (COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:2])
  pairs = ([(cx, scene.choice(rng, SHAPES)) for _ in range(nx)] +
           [(cy, scene.choice(rng, SHAPES)) for _ in range(ny)])
  objects = _objects(rng, pairs, scene.sample_cells(rng, len(pairs)))
  prompt = f'are there more {cx} objects than {cy} objects?'
  return objects, prompt, 'yes' if truth else 'no'


def _compare_sizes(rng):
  colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:4]]
  extra = int(rng.integers(0, 3))
  # Distractors take the remaining colours, so each named colour is unique.
  pairs = [(c, scene.choice(rng, SHAPES)) for c in colours[:2 + extra]]
  scales = [0.95, 0.45] + [0.7] * extra
  objects = _objects(rng, pairs, scene.sample_cells(rng, len(pairs)), scales)
  big, small = colours[0], colours[1]
  first, second = (big, small) if rng.integers(2) else (small, big)
  prompt = f'which is bigger, the {first} object or the {second} object?'
  return objects, prompt, big


def vqa_compare(rng, image_size, split):
  build = _compare_counts if rng.integers(2) else _compare_sizes
  objects, prompt, answer = build(rng)
  return scene.render_scene(objects, image_size, rng), prompt, answer


TASKS = (
    Task('vqa_color', 'exact', vqa_color),
    Task('vqa_shape', 'exact', vqa_shape),
    Task('vqa_count', 'exact', vqa_count),
    Task('vqa_spatial', 'exact', vqa_spatial),
    Task('vqa_compare', 'exact', vqa_compare),
)
