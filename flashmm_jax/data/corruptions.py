"""Image corruptions for robustness evals, at severities 1 (mild) to 5 (harsh).

Each takes a uint8 [H, W, 3] image and a numpy Generator and returns a new
uint8 image of the same shape; the same rng state gives the same output.
Blur and occlusion scale with the image side, so a severity means the same
thing at 32x32 and at 512x512.
"""

import numpy as np
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)

# Per-severity strength, index = severity - 1.
_GAUSSIAN_STD = (0.04, 0.08, 0.12, 0.18, 0.26)         # in [0, 1] intensity
_BLUR_SIGMA = (0.4, 0.7, 1.0, 1.5, 2.2)                # pixels at 64x64
_OCCLUDED_FRACTION = (0.06, 0.12, 0.2, 0.3, 0.4)       # of the image area
_CONTRAST_KEEP = (0.6, 0.45, 0.3, 0.2, 0.1)            # of the deviation from the mean


def _to_uint8(x):
  return np.round(np.clip(x, 0, 255)).astype(np.uint8)


def gaussian(image, severity, rng):
  noise = rng.normal(0, _GAUSSIAN_STD[severity - 1] * 255, image.shape)
  return _to_uint8(image.astype(np.float32) + noise)


def blur(image, severity, rng):
  # Deterministic by nature; rng is accepted so every corruption has one signature.
  sigma = _BLUR_SIGMA[severity - 1] * image.shape[0] / 64
  return _to_uint8(ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0)))


def occlusion(image, severity, rng):
  """A grey rectangle of the severity's area at a random place."""
  h, w = image.shape[:2]
  area = _OCCLUDED_FRACTION[severity - 1] * h * w
  aspect = rng.uniform(0.5, 2.0)
  oh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
  ow = int(np.clip(round(area / oh), 1, w))
  y0 = int(rng.integers(0, h - oh + 1))
  x0 = int(rng.integers(0, w - ow + 1))
  out = image.copy()
  out[y0:y0 + oh, x0:x0 + ow] = 128
  return out


def contrast(image, severity, rng):
  x = image.astype(np.float32)
  mean = x.mean(axis=(0, 1), keepdims=True)
  return _to_uint8(mean + (x - mean) * _CONTRAST_KEEP[severity - 1])


CORRUPTIONS = {'gaussian': gaussian, 'blur': blur, 'occlusion': occlusion,
               'contrast': contrast}


def check_noise(name, severity):
  if name not in CORRUPTIONS:
    raise ValueError(f'Unknown noise {name!r}; valid: {", ".join(CORRUPTIONS)}')
  if severity not in SEVERITIES:
    raise ValueError(f'Noise {name!r}: severity must be 1..5, got {severity!r}')


def parse_noise(spec):
  """'gaussian:3' -> ('gaussian', 3); '' -> None (no corruption)."""
  if not spec:
    return None
  name, sep, level = spec.partition(':')
  if not sep or not level.strip().isdigit():
    raise ValueError(f'Noise spec {spec!r} must look like NAME:SEVERITY, e.g. gaussian:3')
  severity = int(level)
  check_noise(name, severity)
  return name, severity


def apply_noise(image, name, severity, rng):
  check_noise(name, severity)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Noise {name!r} needs a uint8 [H, W, 3] image, '
                     f'got {image.dtype} {image.shape}')
  return CORRUPTIONS[name](image, severity, rng)
