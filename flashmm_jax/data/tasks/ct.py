"""A CT-like task: the Shepp-Logan head phantom with at most one small lesion.

The phantom comes from scikit-image and is resized once per image size. A
lesion is a small bright or dark ellipse placed well inside one quadrant of the
brain, so "where" has exactly one right answer.
"""

import functools

import numpy as np

from flashmm_jax.data import scene
from flashmm_jax.data.tasks.base import Task

QUADRANTS = {  # name -> (sign of x, sign of y); y grows downwards
    'upper left': (-1, -1), 'upper right': (1, -1),
    'lower left': (-1, 1), 'lower right': (1, 1),
}
NOISE_STD = 0.02
LESION_CONTRAST = 0.45
# The brain inside the skull, in [-1, 1] image coordinates (x right, y down).
BRAIN_SEMI_AXES = (0.58, 0.78)
# A display window: the phantom's soft tissue sits at 0.1-0.4, too dark to see
# a dark lesion against; a square-root curve spreads it out (skull stays 1).
WINDOW_GAMMA = 0.5


@functools.lru_cache(maxsize=8)
def phantom(image_size):
  """The phantom as float32 [size, size] in [0, 1]; read-only since it is shared."""
  from skimage.data import shepp_logan_phantom
  from skimage.transform import resize
  scene.check_image_size(image_size)
  image = resize(shepp_logan_phantom(), (image_size, image_size), order=1,
                 anti_aliasing=True)
  image = (np.clip(image, 0, 1) ** WINDOW_GAMMA).astype(np.float32)
  image.setflags(write=False)
  return image


def _lesion_centre(rng, quadrant):
  """A point in the quadrant, away from the midlines and inside the brain."""
  sx, sy = QUADRANTS[quadrant]
  ax, ay = BRAIN_SEMI_AXES
  while True:  # rejection sampling; accepts about two thirds of draws
    x, y = rng.uniform(0.15, 0.5), rng.uniform(0.2, 0.65)
    if (x / ax) ** 2 + (y / ay) ** 2 < 0.85:
      return sx * x, sy * y


def _lesion_mask(rng, image_size, quadrant):
  cx, cy = _lesion_centre(rng, quadrant)
  # Semi-axes in pixels: small, but at least ~1.5 px so 32x32 still shows it.
  a, b = (max(rng.uniform(0.035, 0.07) * image_size, 1.5) for _ in range(2))
  angle = rng.uniform(0, np.pi)
  coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
  dx = (coords[None, :] - cx) * image_size / 2
  dy = (coords[:, None] - cy) * image_size / 2
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _lesion_value(rng, background):
  """Bright or dark at random, flipped where the tissue leaves no room for it.

  A dark lesion inside an already dark ventricle would be invisible and its
  label a lie, so contrast against the local background is guaranteed.
  """
  sign = 1 if rng.integers(2) else -1
  value = background + sign * LESION_CONTRAST
  if not 0.0 <= value <= 1.0:
    value = background - sign * LESION_CONTRAST
  return value


def render_ct(rng, image_size, quadrant):
  """Phantom + optional lesion in `quadrant` (None = healthy) + mild noise, as RGB."""
  image = phantom(image_size).copy()
  if quadrant is not None:
    mask = _lesion_mask(rng, image_size, quadrant)
    image[mask] = _lesion_value(rng, float(image[mask].mean()))
  image += rng.normal(0, NOISE_STD, image.shape).astype(np.float32)
  grey = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def ct_lesion(rng, image_size, split):
  if rng.integers(2):
    present = bool(rng.integers(2))
    quadrant = scene.choice(rng, tuple(QUADRANTS)) if present else None
    prompt, answer = 'is there a lesion?', 'yes' if present else 'no'
  else:
    answer = scene.choice(rng, tuple(QUADRANTS) + ('none',))
    quadrant = None if answer == 'none' else answer
    prompt = 'where is the lesion?'
  return render_ct(rng, image_size, quadrant), prompt, answer


TASKS = (Task('ct_lesion', 'exact', ct_lesion),)
