"""The sparse-attention gate inside the model: dense equivalence, stats, decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flashmm_jax import models
from flashmm_jax.models import decode
from flashmm_jax.models import gate
from tests.models.helpers import batch, build, forward, tiny_config


def sparse_config(**sparse):
  """tiny with a gate; blocks that do not divide the 16 + 44 = 60 tokens (padding path)."""
  config = tiny_config()
  config.model.sparse.update(dict(enabled=True, kernel='reference', block_q=16, block_k=12,
                                  threshold=0.0), **sparse)
  return config


def long_batch(config):
  """3 rows of 44 text tokens, most of them real, so every block has content."""
  b = batch(config, length=44)
  b['text_len'] = np.array([44, 31, 20], np.int32)
  b['prefix_len'] = np.array([6, 25, 3], np.int32)
  rng = np.random.default_rng(1)
  b['text'] = rng.integers(2, config.model.lm.vocab_size, (3, 44)).astype(np.int32)
  b['text'][np.arange(44)[None] >= b['text_len'][:, None]] = 0
  return b


def with_dense_params(config, dense):
  model = build(config)
  nnx.update(model, nnx.state(dense, nnx.Param))
  return model


@nnx.jit
def captured_forward(model, b):
  run = lambda m: m(b['image'], b['text'], b['prefix_len'], b['text_len'])
  logits, captured = nnx.capture(run, nnx.Intermediate)(model)
  return logits, gate.layer_stats(captured)


@pytest.fixture(scope='module')
def dense():
  return build(tiny_config())


@nnx.jit
def logits_and_grads(model, b):
  """Logits, gate stats and the grads of a next-token loss, in one compile."""
  targets = jnp.roll(b['text'], -1, axis=1)

  def loss(m):
    run = lambda m: m(b['image'], b['text'], b['prefix_len'], b['text_len'])
    logits, captured = nnx.capture(run, nnx.Intermediate)(m)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()
    return nll, (logits, gate.layer_stats(captured))

  (_, (logits, stats)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, stats, grads


def test_all_blocks_selected_equals_dense_in_logits_and_grads(dense):
  b = long_batch(tiny_config())
  want_logits, none, want_grads = logits_and_grads(dense, b)
  model = with_dense_params(sparse_config(threshold=0.0), dense)
  logits, stats, grads = logits_and_grads(model, b)
  assert none == {}
  np.testing.assert_allclose(logits, want_logits, atol=2e-5)
  metrics = gate.sparsity_metrics(stats)
  assert float(metrics['sparsity/overall']) == 0.0 and float(metrics['attn_flops_saved']) == 0.0
  assert set(metrics) == {'sparsity/overall', 'attn_flops_saved', 'sparsity/layer_0',
                          'sparsity/layer_1'}
  grads = dict(nnx.to_flat_state(grads))
  for path, g in nnx.to_flat_state(want_grads):
    np.testing.assert_allclose(grads.pop(path).get_value(), g.get_value(), atol=1e-6,
                               err_msg=str(path))
  assert grads and all(gate.GATE_NAME in p for p in grads)  # only the gate's are left
  assert not any(np.asarray(g.get_value()).any() for g in grads.values())  # CE never reaches it


def test_a_selective_gate_prunes_and_reports_per_layer(dense):
  b = long_batch(tiny_config())
  model = with_dense_params(sparse_config(threshold=0.9, top_k=1), dense)
  gate.set_distill(model, True)
  logits, stats = captured_forward(model, b)
  assert np.isfinite(logits).all()
  metrics = {k: float(v) for k, v in gate.sparsity_metrics(stats).items()}
  assert 0.0 < metrics['sparsity/overall'] < 1.0 and metrics['attn_flops_saved'] > 0
  assert metrics['gate/kl'] > 0
  assert np.abs(logits - forward(dense, b)).max() > 1e-3  # pruning changes the output


def test_gate_only_in_lm_layers_with_logical_axes():
  model = build(sparse_config())
  assert len(gate.gates(model)) == model.decoder.blocks.__len__()
  assert all(blk.attn.block_gate is None for blk in model.vision.blocks)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if gate.GATE_NAME in path:
      assert len(var.get_metadata()['out_sharding']) == var.ndim, path


def test_nothing_is_recorded_outside_capture_and_short_sequences_stay_dense(dense):
  model = with_dense_params(sparse_config(), dense)
  forward(model, long_batch(tiny_config()))
  assert not nnx.state(model, nnx.Intermediate)  # no state growth across calls
  short = with_dense_params(sparse_config(min_kv_blocks=10), dense)  # 60 tokens = 5 blocks
  _, stats = captured_forward(short, long_batch(tiny_config()))
  assert stats == {}


@nnx.jit
def captured_prefill(model, image, text, prefix_len):
  cache = models.init_cache(model, text.shape[0], model.num_image_tokens + text.shape[1] + 4)
  run = lambda m: decode._prefill(m, image, text, prefix_len, cache)[0]
  logits, captured = nnx.capture(run, nnx.Intermediate)(model)
  return logits, gate.layer_stats(captured)


def test_sparse_prefill_matches_dense(dense):
  b = long_batch(tiny_config())
  args = (b['image'], b['text'][:, :30], np.minimum(b['prefix_len'], 30))
  want, none = captured_prefill(dense, *args)
  got, stats = captured_prefill(with_dense_params(sparse_config(threshold=0.0), dense), *args)
  assert none == {} and float(stats['visible_tiles'].sum()) > 0  # the sparse path ran
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_bad_sparse_config_is_named():
  with pytest.raises(ValueError, match='gate_dim=7'):
    build(sparse_config(gate_dim=7))
  with pytest.raises(ValueError, match="Unknown sparse attention implementation 'nope'"):
    build(sparse_config(kernel='nope'))


def test_remat_keeps_the_gate_stats(dense):
  config = sparse_config()
  config.model.remat = 'full'
  _, stats = captured_forward(with_dense_params(config, dense), long_batch(config))
  assert stats['visible_tiles'].shape == (2,)

