import pytest

from configs import flash
from configs import pro
from flashmm_jax import summary


def _total(config):
  rows = summary.table(config)
  assert rows[-1][0] == 'total'
  return rows[-1][1:]


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', '7b'])
def test_pro_is_bigger_than_flash(size):
  flash_params = _total(flash.get_config(size))[0]
  pro_params = _total(pro.get_config(size))[0]
  assert pro_params > flash_params > 0


def test_flash_7b_is_seven_billion_params():
  params, f32_bytes, bf16_bytes = _total(flash.get_config('7b'))
  assert 6.8e9 < params < 7.3e9
  assert f32_bytes == 4 * params and bf16_bytes == 2 * params
  counts = summary.count(flash.get_config('7b'))
  assert counts['LM embedding'] == 32000 * 4096
  assert counts['LM MLP'] == 32 * 3 * 4096 * 13312
  assert counts['LM attention'] == 32 * 2 * 4096 * (32 + 8) * 128
