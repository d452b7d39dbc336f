"""Noise corruptions: shape/dtype kept, images changed, deterministic, monotone."""

import numpy as np
import pytest

from flashmm_jax.data.corruptions import CORRUPTIONS, SEVERITIES, apply_noise, parse_noise
from flashmm_jax.data.tasks import make_example


@pytest.fixture(scope='module')
def image():
  return make_example('vqa_count', 'eval', 2, 0, 64)['image']


@pytest.mark.parametrize('name', sorted(CORRUPTIONS))
def test_corruption_changes_image_and_keeps_dtype_shape(image, name):
  before = image.copy()
  distances = []
  for severity in SEVERITIES:
    out = apply_noise(image, name, severity, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert not np.array_equal(out, image)
    distances.append(np.abs(out.astype(np.int32) - image).mean())
  np.testing.assert_array_equal(image, before)  # input untouched
  assert distances[-1] > distances[0], distances  # harsher at higher severity


@pytest.mark.parametrize('name', sorted(CORRUPTIONS))
def test_corruption_is_deterministic_given_rng(image, name):
  a = apply_noise(image, name, 3, np.random.default_rng(5))
  b = apply_noise(image, name, 3, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('size', [32, 512])
def test_corruptions_work_at_other_sizes(size):
  img = make_example('ct_lesion', 'train', 0, 0, size)['image']
  for name in CORRUPTIONS:
    assert apply_noise(img, name, 5, np.random.default_rng(1)).shape == img.shape


def test_parse_noise():
  assert parse_noise('gaussian:3') == ('gaussian', 3)
  assert parse_noise('occlusion:5') == ('occlusion', 5)
  assert parse_noise('') is None


@pytest.mark.parametrize('spec, message', [
    ('snow:2', "Unknown noise 'snow'"),
    ('blur:0', 'severity must be 1..5'),
    ('blur:6', 'severity must be 1..5'),
    ('blur', 'NAME:SEVERITY'),
    ('blur:x', 'NAME:SEVERITY'),
])
def test_bad_noise_specs_raise(spec, message):
  with pytest.raises(ValueError, match=message):
    parse_noise(spec)


def test_apply_noise_rejects_bad_input(image):
  with pytest.raises(ValueError, match="Unknown noise 'fog'"):
    apply_noise(image, 'fog', 1, np.random.default_rng(0))
  with pytest.raises(ValueError, match='uint8'):
    apply_noise(image.astype(np.float32), 'blur', 1, np.random.default_rng(0))
