import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flashmm_jax import models
from tests.models.helpers import batch, build, forward, tiny_config


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  return config, build(config)


def test_forward_shape_and_dtype(tiny):
  config, model = tiny
  b = batch(config)
  logits = forward(model, b)
  assert logits.shape == (3, 12, config.model.lm.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  assert models.num_image_tokens(config) == model.num_image_tokens == 16


def _changed(model, b, row, pos):
  """Which text positions' logits change when text[row, pos] changes."""
  other = {**b, 'text': b['text'].copy()}
  other['text'][row, pos] = (b['text'][row, pos] + 1) % 1000 + 2
  diff = np.abs(forward(model, b)[row] - forward(model, other)[row]).max(-1)
  return diff > 1e-5


def test_prefix_is_bidirectional_and_blind_to_the_answer(tiny):
  config, model = tiny
  b = batch(config)  # row 1: prefix 5, text_len 9
  # An answer token: earlier positions (prefix and answer) ignore it, later ones see it.
  np.testing.assert_array_equal(_changed(model, b, 1, 6)[:9],
                                [0, 0, 0, 0, 0, 0, 1, 1, 1])
  # A prompt token is seen by every valid position, including earlier prompt tokens.
  assert _changed(model, b, 1, 3)[:9].all()
  # A padding token is seen by no valid position.
  assert not _changed(model, b, 1, 10)[:9].any()


def test_params_carry_logical_axis_names(tiny):
  _, model = tiny
  allowed = {'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab', 'patch', None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata()['out_sharding']
    assert len(names) == var.ndim and set(names) <= allowed, (path, names)


@pytest.mark.parametrize('param_dtype,dtype', [('float32', 'bfloat16'), ('bfloat16', 'float32')])
def test_param_and_compute_dtypes(param_dtype, dtype):
  config = tiny_config(param_dtype=param_dtype, dtype=dtype)
  model = build(config)
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(param_dtype)}
  b = batch(config, b=1)
  assert model.embed_image(b['image']).dtype == jnp.dtype(dtype)
  assert model.decoder.embed(b['text']).dtype == jnp.dtype(dtype)
  assert forward(model, b).dtype == jnp.float32


def test_remat_matches_no_remat():
  shallow = dict(depth=1, width=64, num_heads=2, mlp_dim=64, patch_size=8)
  config = tiny_config(vision=shallow)
  config.model.lm.depth = 1
  b = batch(config)

  def loss(model):
    logits = model(b['image'], b['text'], b['prefix_len'], b['text_len'])
    targets = jnp.roll(b['text'], -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  want_loss, want_grads = nnx.jit(nnx.value_and_grad(loss))(build(config))
  for policy in ('full', 'dots', 'dots_no_batch'):
    config.model.remat = policy
    got_loss, got_grads = nnx.jit(nnx.value_and_grad(loss))(build(config))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
                 got_grads, want_grads)


def _n_params(config):
  abstract = nnx.eval_shape(lambda: build(config))
  return sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_sharing_vision_lm_mlp_drops_the_vision_mlps():
  vision = dict(width=128, depth=2, num_heads=2, mlp_dim=96, patch_size=8)
  separate = tiny_config(vision=vision)
  shared = tiny_config(vision=vision, share_vision_lm_mlp=True)
  vision_mlp = 128 * 96 + 96 + 96 * 128 + 128  # fc1 + bias, fc2 + bias
  assert _n_params(separate) - _n_params(shared) == 2 * vision_mlp
  model = build(shared)
  assert model.vision.blocks[1].mlp is model.decoder.blocks[1].mlp
  assert np.isfinite(forward(model, batch(shared))).all()


def test_clear_errors(tiny):
  config, model = tiny
  b = batch(config, b=1)
  with pytest.raises(ValueError, match=r'image of shape \(1, 16, 16, 3\).*image_size=32'):
    model(b['image'][:, :16, :16], b['text'], b['prefix_len'], b['text_len'])
  with pytest.raises(ValueError, match='token id 5000 outside'):
    model(b['image'], b['text'] + 5000 - b['text'].max(), b['prefix_len'], b['text_len'])
  with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash9'"):
    build(tiny_config(attention='flash9'))
  with pytest.raises(ValueError, match=r"Unknown config.model.remat 'some'"):
    build(tiny_config(remat='some'))
  bad_gqa = tiny_config()
  bad_gqa.model.lm.num_kv_heads = 3
  with pytest.raises(ValueError, match='num_heads=4 is not a multiple of .*num_kv_heads=3'):
    build(bad_gqa)
  with pytest.raises(ValueError, match='share_vision_lm_mlp.*vision width=64.*lm width=128'):
    build(tiny_config(share_vision_lm_mlp=True))


@pytest.mark.parametrize('stem, expected_layers', [('conv', 3), ('patch', 0)])
def test_both_vision_stems_give_one_token_per_patch(stem, expected_layers):
  config = tiny_config(vision=dict(width=64, depth=1, num_heads=2, mlp_dim=64, patch_size=8,
                                   stem=stem))
  model = build(config)
  assert len(getattr(model.vision.embed, 'convs', ())) == expected_layers  # log2(8) convs
  tokens = model.vision(batch(config)['image'])
  assert tokens.shape == (3, (32 // 8) ** 2, 64)


def test_vision_stem_errors():
  bad = dict(width=64, depth=1, num_heads=2, mlp_dim=64, patch_size=8, stem='fft')
  with pytest.raises(ValueError, match=r"Unknown config.model.vision.stem 'fft'"):
    build(tiny_config(vision=bad))
  odd = dict(bad, stem='conv', patch_size=6)
  config = tiny_config(vision=odd)
  config.data.image_size = 36
  with pytest.raises(ValueError, match='power-of-two patch_size, got 6'):
    build(config)
