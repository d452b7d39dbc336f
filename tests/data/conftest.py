"""Shared fixtures for the data tests: the shipped tokenizer and a tiny config."""

import pytest

from configs import common
from flashmm_jax.data import get_tokenizer


@pytest.fixture(scope='session')
def suite_tokenizer():
  return get_tokenizer('suite')


@pytest.fixture
def tiny_config():
  """The tiny smoke-test config: 32x32 images, L=48, batch 8, eval batch 16."""
  return common.base_config('flash', 'tiny', runlocal=True)
