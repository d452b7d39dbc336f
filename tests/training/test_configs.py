import pytest

from configs import baseline
from configs import common
from configs import flash
from configs import pro


@pytest.mark.parametrize('module', [flash, pro, baseline])
@pytest.mark.parametrize('variant', sorted(common.SIZE_DATA))
def test_every_variant_builds(module, variant):
  c = module.get_config(variant)
  assert c.model.size == variant
  assert c.model.lm.num_heads % c.model.lm.num_kv_heads == 0
  assert c.data.image_size % c.model.vision.patch_size == 0


def test_runlocal_shrinks_a_run():
  c = flash.get_config('small,runlocal')
  assert c.train.total_steps < flash.get_config('small').train.total_steps
  assert c.model.lm.width == flash.get_config('small').model.lm.width


def test_unknown_variant_lists_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown variant 'huge'.*'tiny'"):
    flash.get_config('huge')


def test_unknown_argument_is_rejected():
  with pytest.raises(ValueError, match="Unknown config argument 'fast'"):
    flash.get_config('tiny,fast')


def test_locked_config_rejects_unknown_keys():
  c = flash.get_config('tiny')
  c.lock()  # as config_flags does for command-line overrides
  c.train.total_steps = 7
  assert c.train.total_steps == 7
  with pytest.raises(AttributeError):
    c.train.total_stepz = 7


def test_pro_is_larger_than_flash_at_every_size():
  for size in common.SIZE_DATA:
    f, p = common.SIZES['flash'][size], common.SIZES['pro'][size]
    assert p['lm'][0] * p['lm'][1] > f['lm'][0] * f['lm'][1]


def test_baseline_is_flash_shape_with_plain_paths():
  b, f = baseline.get_config('small'), flash.get_config('small')
  assert b.model.lm.to_dict() == f.model.lm.to_dict()
  assert (b.model.attention, b.model.matmul, b.model.dtype) == ('xla', 'xla', 'bfloat16')


@pytest.mark.parametrize('variant', sorted(common.SIZE_DATA))
def test_sparse_flag_is_the_gate_recipe(variant):
  assert not flash.get_config(variant).model.sparse.enabled  # dense unless asked
  c = flash.get_config(f'{variant},sparse')
  assert c.model.sparse.enabled and c.train.trainable == 'gate' and c.train.gate_loss_weight > 0
  tokens = (c.data.image_size // c.model.vision.patch_size) ** 2 + c.data.max_text_len
  assert tokens // c.model.sparse.block_k >= 4, 'too few key blocks to prune'
  joint = flash.get_config(f'{variant},sparse,joint')
  assert joint.model.sparse.enabled and joint.train.trainable == 'all'
  assert joint.train.lr < c.train.lr   # the LM moves gently off its dense optimum
  # The measured joint recipe: only the image's query tiles are pruned.
  assert joint.model.sparse.dense_text and not c.model.sparse.dense_text
