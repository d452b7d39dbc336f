"""Rendering shared by the visual tasks: a grid of cells holding coloured shapes.

Everything draws into uint8 RGB arrays with numpy masks, so a scene at any size
from 16 to 512 pixels is a few array operations. Geometry is in fractions of a
cell, so the same scene stays legible at 64x64 (3x3 grid of ~21 px cells) and
merely shrinks at 32x32.
"""

import dataclasses

import numpy as np

GRID = 3  # rows and columns of cells in every grid scene
MIN_IMAGE_SIZE = 16

# Far apart in RGB (each pair differs by >= ~200 in some channel), so a small
# per-object jitter never makes one colour look like another.
COLOURS = {
    'red': (235, 30, 30),
    'green': (30, 215, 40),
    'blue': (40, 70, 250),
    'yellow': (245, 230, 35),
    'magenta': (225, 40, 225),
    'cyan': (35, 220, 230),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ('circle', 'square', 'triangle', 'cross')
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
           'cross': 'crosses'}

BACKGROUND = (18, 18, 22)
COLOUR_JITTER = 20


@dataclasses.dataclass(frozen=True)
class Obj:
  """One shape in one grid cell. `scale` is its extent as a fraction of the cell."""
  colour: str
  shape: str
  row: int
  col: int
  scale: float = 0.7

  @property
  def name(self):
    return f'{self.colour} {self.shape}'


def check_image_size(image_size):
  if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}')


def blank(image_size, colour=BACKGROUND):
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = colour
  return image


def cell_box(image_size, row, col, grid=GRID):
  """Pixel bounds (y0, y1, x0, x1) of a cell; rounding spreads leftover pixels."""
  edges = np.round(np.linspace(0, image_size, grid + 1)).astype(int)
  return edges[row], edges[row + 1], edges[col], edges[col + 1]


def jittered_colour(rng, name):
  base = np.array(COLOURS[name], np.int32)
  return np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)


# Each predicate maps cell-local coordinates (u right, v down, the shape's
# half-extent = 1) to a boolean mask. Areas are roughly matched so size never
# gives the shape away.
def _circle(u, v):
  return u * u + v * v <= 1.0


def _square(u, v):
  return np.maximum(np.abs(u), np.abs(v)) <= 0.82


def _triangle(u, v):
  # Apex up; the base sits a little above the bottom of the box.
  return (v >= -1.0) & (v <= 0.85) & (np.abs(u) <= (v + 1.0) / 1.85)


def _cross(u, v):
  au, av = np.abs(u), np.abs(v)
  return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))


SHAPE_MASKS = {'circle': _circle, 'square': _square, 'triangle': _triangle,
               'cross': _cross}


def shape_mask(shape, height, width, cy, cx, radius):
  """Mask of a shape centred at (cy, cx) in a height x width box."""
  if shape not in SHAPE_MASKS:
    raise ValueError(f'Unknown shape {shape!r}; valid: {SHAPES}')
  ys = (np.arange(height, dtype=np.float32) + 0.5 - cy) / radius
  xs = (np.arange(width, dtype=np.float32) + 0.5 - cx) / radius
  return SHAPE_MASKS[shape](xs[None, :], ys[:, None])


def draw_object(image, obj, rng, grid=GRID):
  """Draws `obj` into its cell with a random offset that keeps it inside."""
  y0, y1, x0, x1 = cell_box(image.shape[0], obj.row, obj.col, grid)
  h, w = y1 - y0, x1 - x0
  radius = max(obj.scale * min(h, w) / 2, 1.0)
  slack_y, slack_x = max(h / 2 - radius, 0), max(w / 2 - radius, 0)
  cy = h / 2 + rng.uniform(-slack_y, slack_y)
  cx = w / 2 + rng.uniform(-slack_x, slack_x)
  mask = shape_mask(obj.shape, h, w, cy, cx, radius)
  image[y0:y1, x0:x1][mask] = jittered_colour(rng, obj.colour)


def render_scene(objects, image_size, rng, grid=GRID):
  """A grid scene: every object drawn in its own cell on a dark background."""
  check_image_size(image_size)
  cells = [(o.row, o.col) for o in objects]
  if len(set(cells)) != len(cells):
    raise ValueError(f'Two objects share a cell: {cells}')
  image = blank(image_size)
  for obj in objects:
    draw_object(image, obj, rng, grid)
  return image


def paint_glyph(image, glyph, box, colour):
  """Alpha-blends a [0, 1] glyph (e.g. an 8x8 digit) into box, nearest-upsampled."""
  y0, y1, x0, x1 = box
  h, w = y1 - y0, x1 - x0
  rows = np.arange(h) * glyph.shape[0] // h
  cols = np.arange(w) * glyph.shape[1] // w
  alpha = glyph[rows][:, cols][..., None]
  region = image[y0:y1, x0:x1].astype(np.float32)
  blended = region * (1 - alpha) + np.asarray(colour, np.float32) * alpha
  image[y0:y1, x0:x1] = np.round(blended).astype(np.uint8)


def inner_box(box, fraction, rng=None):
  """A square sub-box holding `fraction` of the box's side, optionally shifted."""
  y0, y1, x0, x1 = box
  side = max(int(round(min(y1 - y0, x1 - x0) * fraction)), 1)
  free_y, free_x = (y1 - y0) - side, (x1 - x0) - side
  oy = free_y // 2 if rng is None else int(rng.integers(0, free_y + 1))
  ox = free_x // 2 if rng is None else int(rng.integers(0, free_x + 1))
  return y0 + oy, y0 + oy + side, x0 + ox, x0 + ox + side


# Sampling helpers: the tasks pick the attribute that is asked about first
# (so answers are balanced), then fill the rest of the scene from these.
def sample_cells(rng, n, exclude=(), grid=GRID):
  """n distinct (row, col) cells, none of them in `exclude`."""
  free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in exclude]
  if n > len(free):
    raise ValueError(f'Cannot place {n} objects in {len(free)} free cells')
  picks = rng.choice(len(free), size=n, replace=False)
  return [free[i] for i in picks]


def sample_pairs(rng, n, exclude=()):
  """n distinct (colour, shape) pairs, none of them in `exclude`."""
  pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in exclude]
  picks = rng.choice(len(pairs), size=n, replace=False)
  return [pairs[i] for i in picks]


def choice(rng, options):
  """A uniformly chosen element of a sequence, as its own Python type."""
  return options[int(rng.integers(len(options)))]


def sample_scale(rng):
  return float(rng.uniform(0.6, 0.8))
