"""Reading a bar chart: 3-5 coloured bars with integer heights 1-9."""

from flashmm_jax.data import scene
from flashmm_jax.data.scene import COLOUR_NAMES
from flashmm_jax.data.tasks.base import Task

MAX_HEIGHT = 9
MARGIN = 0.06          # plot margin as a fraction of the image side
BAR_FRACTION = 0.65    # bar width as a fraction of its slot
GRIDLINE = (70, 70, 78)  # one faint line per unit, so heights can be read off


def render_chart(rng, colours, heights, image_size):
  scene.check_image_size(image_size)
  image = scene.blank(image_size)
  margin = max(int(round(image_size * MARGIN)), 1)
  top, bottom = margin, image_size - margin
  left, right = margin, image_size - margin
  unit = (bottom - top) / MAX_HEIGHT
  for level in range(1, MAX_HEIGHT + 1):
    image[int(round(bottom - level * unit)), left:right] = GRIDLINE
  slot = (right - left) / len(colours)
  for i, (colour, height) in enumerate(zip(colours, heights)):
    centre = left + (i + 0.5) * slot
    half = max(slot * BAR_FRACTION / 2, 0.5)
    x0, x1 = int(round(centre - half)), int(round(centre + half))
    y0 = int(round(bottom - height * unit))
    image[y0:bottom, x0:max(x1, x0 + 1)] = scene.jittered_colour(rng, colour)
  return image


def _tallest_heights(rng, n):
  """Heights whose maximum is unique and sits at index 0."""
  top = int(rng.integers(2, MAX_HEIGHT + 1))
  return [top] + [int(h) for h in rng.integers(1, top, size=n - 1)]


def chart_read(rng, image_size, split):
  n = int(rng.integers(3, 6))
  colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))[:n]]
  ask_tallest = bool(rng.integers(2))
  if ask_tallest:
    heights = _tallest_heights(rng, n)
    prompt, answer = 'which bar is tallest?', colours[0]
  else:
    heights = [int(h) for h in rng.integers(1, MAX_HEIGHT + 1, size=n)]
    prompt, answer = f'how tall is the {colours[0]} bar?', str(heights[0])
  # The asked-about bar was built first; shuffle so it is not always leftmost.
  order = rng.permutation(n)
  image = render_chart(rng, [colours[i] for i in order], [heights[i] for i in order], image_size)
  return image, prompt, answer


TASKS = (Task('chart_read', 'exact', chart_read),)

