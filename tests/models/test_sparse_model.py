"""The sparse-attention gate inside the model: dense equivalence, stats, decode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flashmm_jax import models
from flashmm_jax import ops
from flashmm_jax.evaluation import runner
from flashmm_jax.models import decode
from flashmm_jax.models import gate
from flashmm_jax.models import layers
from flashmm_jax.ops import sparse_gate as sg
from tests.models.helpers import batch, build, forward, tiny_config
from tests.models.test_decode import _make_context_matter


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


def test_dense_text_prunes_only_image_rows_so_one_layer_text_logits_are_dense():
  # One LM layer: the text rows' keys are the embeddings themselves, so with
  # every text query tile dense the text logits are the dense model's exactly.
  def one_layer(config):
    config.model.lm.depth = 1
    return config

  b = long_batch(tiny_config())
  dense1 = build(one_layer(tiny_config()))
  rule = dict(threshold=0.9, top_k=1, block_q=8, block_k=8)
  pruned = with_dense_params(one_layer(sparse_config(**rule)), dense1)
  text_dense = with_dense_params(one_layer(sparse_config(dense_text=True, **rule)), dense1)
  assert {g.dense_from for g in gate.gates(text_dense)} == {text_dense.num_image_tokens}
  want = forward(dense1, b)
  logits, stats = captured_forward(text_dense, b)
  np.testing.assert_allclose(logits, want, atol=2e-5)
  # The image's rows were pruned all the same, less than without dense_text.
  sparsity = lambda s: float(gate.sparsity_metrics(s)['sparsity/overall'])
  pruned_logits, pruned_stats = captured_forward(pruned, b)
  assert 0.0 < sparsity(stats) < sparsity(pruned_stats)
  assert np.abs(pruned_logits - want).max() > 1e-3


def test_bad_sparse_config_is_named():
  with pytest.raises(ValueError, match='gate_dim=7'):
    build(sparse_config(gate_dim=7))
  with pytest.raises(ValueError, match='decode and dense_text are both True'):
    build(sparse_config(decode=True, dense_text=True))
  with pytest.raises(ValueError, match="Unknown sparse attention implementation 'nope'"):
    build(sparse_config(kernel='nope'))


def test_remat_keeps_the_gate_stats(dense):
  config = sparse_config()
  config.model.remat = 'full'
  _, stats = captured_forward(with_dense_params(config, dense), long_batch(config))
  assert stats['visible_tiles'].shape == (2,)


# ------------------------------------------------ sparse decode steps (decode=True) ---

@functools.partial(nnx.jit, static_argnames='steps')
def decode_steps(model, image, text, prefix_len, steps):
  """Prefill + `steps` greedy steps -> (logits [steps + 1, B, V], cache); the
  token fed at step t is the argmax of logits[t]."""
  n = model.num_image_tokens
  cache = models.init_cache(model, text.shape[0], n + text.shape[1] + steps)
  logits, cache = decode._prefill(model, image, text, prefix_len, cache)
  prefix = n + prefix_len
  every = [logits]
  for t in range(steps):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits, cache = decode._step(model, token, prefix + t, prefix, cache)
    every.append(logits)
  return jnp.stack(every), cache


def test_sparse_decode_keeping_every_block_equals_dense_decode(dense):
  b = long_batch(tiny_config())
  inputs = (b['image'], b['text'], b['prefix_len'])
  runs = []
  for on in (False, True):  # threshold, top_k and coverage 0: every visible block
    model = with_dense_params(sparse_config(decode=on), dense)
    _make_context_matter(model)
    tokens, stats = runner.make_decoder(model, 8, eos_id=-1)(*inputs)
    logits, cache = decode_steps(model, *inputs, steps=4)
    runs.append((np.asarray(tokens), stats, logits, cache))
  (want_tokens, want_stats, want_logits, _), (tokens, stats, logits, cache) = runs
  np.testing.assert_array_equal(tokens, want_tokens)
  assert len(np.unique(tokens)) > 3
  np.testing.assert_allclose(logits, want_logits, atol=2e-5)
  # Kept statistics, and the decode steps' counters.
  assert set(cache[0]) == {'k', 'v', *sg.KEY_STATS, gate.GATE_KEY, *gate.DECODE_COUNTS}
  # The prefill's figures are the dense-decoding model's; the decode steps' are
  # new, and keep every visible block.
  decode_names = {'decode_kept_blocks', 'decode_visible_blocks', 'decode_flops_saved'}
  assert stats.keys() == want_stats.keys() | decode_names
  assert float(stats['visible_tiles'].sum()) > 0
  for name, value in want_stats.items():
    np.testing.assert_array_equal(stats[name], value, err_msg=name)
  np.testing.assert_array_equal(stats['decode_kept_blocks'], stats['decode_visible_blocks'])
  assert float(gate.sparsity_metrics(stats)['sparsity/decode']) == 0.0


def test_the_decoder_reports_its_sparse_decode_steps(dense):
  """generate's decode steps, counted in the cache and recorded after its loop:
  per layer the blocks they read and the blocks visible to them, by hand."""
  config = sparse_config(decode=True, top_k=1)
  model = with_dense_params(config, dense)
  b = long_batch(config)
  steps = 5
  counters = lambda: set(gate.DECODE_COUNTS) & set(models.init_cache(model, 3, 64)[0])
  assert not counters()   # off by default: a kernel a step
  _, stats = runner.make_decoder(model, steps + 1, eos_id=-1)(b['image'], b['text'],
                                                              b['prefix_len'])
  assert counters() == set(gate.DECODE_COUNTS)   # the eval's decoder turned them on
  hkv, bk = config.model.lm.num_kv_heads, config.model.sparse.block_k
  kv_len = model.num_image_tokens + b['prefix_len'][:, None] + np.arange(1, steps + 1)
  visible = -(-kv_len // bk)                               # blocks below kv_len
  kept = np.minimum(visible, np.where(visible > 1, 2, 1) + 1)   # forced + top_k 1
  depth = config.model.lm.depth
  np.testing.assert_array_equal(stats['decode_visible_blocks'], [hkv * visible.sum()] * depth)
  np.testing.assert_array_equal(stats['decode_kept_blocks'], [hkv * kept.sum()] * depth)
  metrics = gate.sparsity_metrics(stats)
  np.testing.assert_allclose(metrics['sparsity/decode'], 1 - kept.sum() / visible.sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['sparsity/decode_layer_1'], metrics['sparsity/decode'])
  per_block = 4 * bk * config.model.lm.head_dim * (config.model.lm.num_heads // hkv)
  np.testing.assert_allclose(metrics['decode_attn_flops_saved'],
                             depth * hkv * (visible - kept).sum() * per_block, rtol=1e-6)


def _rope(x, positions, base):
  return np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(positions), base), np.float64)


def _softmax(logits, keep):
  logits = np.where(keep, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _gate_probs(block_gate, q_raw, k_pre, pos, kv_len):
  """By hand: the gate's probabilities [B, Hkv, nK] of the new tokens' query
  q_raw [B, Hq, D] at pos against the key blocks of pre-rotary k_pre [B, S, Hkv, D]."""
  bk, base, group = block_gate.block_sizes.block_k, block_gate.rope_base, block_gate.group
  pooled = np.asarray(sg.pool_keys(jnp.asarray(k_pre, jnp.float32), bk, kv_len), np.float64)
  b, n_k = pooled.shape[:2]
  gk = np.einsum('bkhe,heg->bkhg', pooled, np.asarray(block_gate.k_proj[...]))
  gk = _rope(gk, np.broadcast_to(np.arange(n_k) * bk, (b, n_k)), base)
  gq = np.einsum('bhd,hdg->bhg', q_raw, np.asarray(block_gate.q_proj[...]))
  gq = _rope(gq[:, None], pos[:, None], base)[:, 0]
  logits = np.einsum('bhg,bkhg->bhk', gq, np.repeat(gk, group, axis=2)) / np.sqrt(gq.shape[-1])
  visible = (np.arange(n_k) * bk < kv_len[:, None])[:, None]
  return _softmax(logits, visible).reshape(b, -1, group, n_k).mean(2), visible


def _hand_selection(p, visible, forced, threshold, top_k):
  """select_blocks by hand on [B, Hkv, nK] probabilities (no coverage)."""
  keep = p >= threshold * np.where(visible, p, 0).max(-1, keepdims=True)
  if top_k:
    score = np.where(visible & ~forced, p, -1.0)
    keep &= score >= -np.sort(-score, axis=-1)[..., top_k - 1:top_k]   # the top_k best
  return (keep | forced) & visible


# 'triton' on a CPU host: the gate's step and selection kernels and the sparse decode
# kernel, interpreted (the GPU's path; its tiles are powers of two); 'reference':
# the XLA path.
KERNELS = {'reference': dict(kernel='reference'), 'triton': dict(kernel='triton', block_k=16)}


@pytest.mark.parametrize('kernel', KERNELS)
@pytest.mark.parametrize('rule', [dict(top_k=1), dict(threshold=0.9)])
def test_pruned_decode_step_equals_attention_over_the_selected_blocks(dense, rule, kernel):
  config = sparse_config(decode=True, **KERNELS[kernel], **rule)
  model = with_dense_params(config, dense)
  b = long_batch(config)
  prefix_len = np.array([40, 25, 30], np.int32)    # 4-5 visible key blocks of 12 per row
  _, caches = decode_steps(model, b['image'], b['text'], prefix_len, steps=3)
  attn = model.decoder.blocks[0].attn
  prefix = model.num_image_tokens + prefix_len
  pos = prefix + 3
  mask = ops.attention.MaskSpec(q_offset=pos, kv_len=pos + 1, prefix_len=prefix, causal=True)
  x = jax.random.normal(jax.random.key(5), (3, 1, config.model.lm.width))
  out, cache = attn(x, pos[:, None], mask, caches[0])

  # The step by hand: its key and value written into the cache, the keys un-rotated
  # for the gate, its selection rule, softmax attention over the kept blocks only.
  rows, base = np.arange(3), attn.rope_base
  as64 = lambda a: np.asarray(a, np.float64)
  q_raw, k_new, v_new = (as64(f(x))[:, 0] for f in (attn.q, attn.k, attn.v))
  k_rot, v_all = as64(caches[0]['k']), as64(caches[0]['v'])
  k_rot[rows, pos] = _rope(k_new[:, None], pos[:, None], base)[:, 0]
  v_all[rows, pos] = v_new
  s = k_rot.shape[1]
  k_pre = _rope(k_rot, -np.broadcast_to(np.arange(s), (3, s)), base)
  g = attn.block_gate
  probs, visible = _gate_probs(g, q_raw, k_pre, pos, pos + 1)
  bk, n_k = g.block_sizes.block_k, probs.shape[-1]
  blocks = np.arange(n_k)
  forced = ((blocks == 0) | (blocks == (pos // bk)[:, None]))[:, None]
  keep = _hand_selection(probs, visible, forced, g.threshold, g.top_k)   # [B, Hkv, nK]
  np.testing.assert_array_equal(g.select_decode(attn.q(x), cache, mask)[:, :, 0], keep)
  assert (keep.sum(-1) < visible.sum(-1)).any(), 'the rule pruned nothing'

  def attention(blocks_kept):
    q = _rope(q_raw[:, None], pos[:, None], base)[:, 0]
    keys = np.repeat(np.repeat(blocks_kept, bk, -1), g.group, 1)            # [B, Hq, S]
    keys &= (np.arange(s) < (pos + 1)[:, None])[:, None]
    logits = np.einsum('bhd,bshd->bhs', q, np.repeat(k_rot, g.group, 2)) / np.sqrt(q.shape[-1])
    o = np.einsum('bhs,bshd->bhd', _softmax(logits, keys), np.repeat(v_all, g.group, 2))
    return np.asarray(attn.o(jnp.asarray(o[:, None], jnp.float32)))

  np.testing.assert_allclose(cache['k'], k_rot, atol=1e-6)
  np.testing.assert_allclose(out, attention(keep), atol=2e-5)
  assert np.abs(out - attention(np.broadcast_to(visible, keep.shape))).max() > 1e-4


@pytest.mark.parametrize('kernel', KERNELS)
def test_cache_key_statistics_are_the_pooled_keys_of_the_whole_sequence(dense, kernel):
  # Keeps every block: decoding equals the forward.
  config = sparse_config(decode=True, **KERNELS[kernel])
  model = with_dense_params(config, dense)
  _make_context_matter(model)
  b = long_batch(config)
  steps, n = 7, model.num_image_tokens
  prefix_len = np.array([6, 25, 13], np.int32)   # decoding crosses block boundaries
  logits, caches = decode_steps(model, b['image'], b['text'], prefix_len, steps=steps)

  # The whole sequence (the prompt, then the decoded tokens) in one forward pass,
  # capturing each layer's pre-rotary keys.
  text = np.zeros((3, b['text'].shape[1] + steps), np.int32)
  text[:, :b['text'].shape[1]] = b['text']
  text[np.arange(3)[:, None], prefix_len[:, None] + np.arange(steps)] = \
      np.asarray(jnp.argmax(logits[:steps], -1)).T
  run = lambda m: m(b['image'], text, prefix_len, prefix_len + steps)
  _, captured = nnx.capture(run, nnx.Intermediate, method_outputs=nnx.Intermediate)(model)
  captured = dict(nnx.to_flat_state(captured))
  kv_len, bk = n + prefix_len + steps, config.model.sparse.block_k
  for i, cache in enumerate(caches):
    k_raw = captured[('decoder', 'blocks', i, 'attn', 'k', '__call__')].get_value()[0]
    k_raw = jnp.pad(k_raw, ((0, 0), (0, cache['k'].shape[1] - k_raw.shape[1]), (0, 0), (0, 0)))
    pooled = sg.pool_keys(k_raw, bk, kv_len)
    np.testing.assert_allclose(sg.pooled_key_stats(cache, kv_len, bk), pooled, atol=1e-5,
                               err_msg=f'layer {i}')
    # Each block's gate key, re-projected only when a token landed in it, is the
    # projection of the whole sequence's pooled keys.
    g = model.decoder.blocks[i].attn.block_gate
    np.testing.assert_allclose(cache[gate.GATE_KEY], g._gate_keys(pooled), atol=1e-4,
                               err_msg=f'layer {i}')   # pylint: disable=protected-access


def test_cache_layout_and_the_decode_flag_is_checked():
  model = build(sparse_config(decode=True))
  cache = models.init_cache(model, 2, 30)                 # rounds up to 3 blocks of 12
  hkv, d = model.decoder.blocks[0].attn.k.out_shape
  assert cache[0]['k'].shape == (2, 36, hkv, d)
  for name in sg.KEY_STATS:
    assert cache[0][name].shape == (2, 3, hkv, d) and cache[0][name].dtype == jnp.float32
  gate_dim = model.decoder.blocks[0].attn.block_gate.q_proj[...].shape[-1]
  assert cache[0][gate.GATE_KEY].shape == (2, hkv, 3, gate_dim)
  assert not cache[0][gate.GATE_KEY].any()                # an empty block's key is 0
  off = tiny_config()
  off.model.sparse.decode = True                          # no gate: ignored, dense decode
  assert all(set(c) == {'k', 'v'} and c['k'].shape[1] == 30
             for c in models.init_cache(build(off), 2, 30))
  with pytest.raises(TypeError, match="field 'decode'"):   # the config's own type check
    sparse_config(decode='yes')
  with pytest.raises(ValueError, match='config.model.sparse.decode=None must be True or False'):
    build(sparse_config(decode=None))                     # what the type check lets through
  # Kernels with no decode version decode through 'auto'.
  assert [ops.sparse_attention.decode_implementation(k)
          for k in ('mosaic', 'mosaic_persistent', 'tpu', 'triton', 'reference', 'auto')] == \
      ['mosaic', 'mosaic', 'auto', 'triton', 'reference', 'auto']
