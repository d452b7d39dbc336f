import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flashmm_jax import models
from tests.models.helpers import build, forward, tiny_config

MAX_NEW = 6


def _reference(model, image, prompt, prefix_len, eos_id):
  """Greedy decode by re-running the full forward on the growing sequence."""
  b = prompt.shape[0]
  text = np.zeros((b, prompt.shape[1] + MAX_NEW), np.int32)
  text[:, :prompt.shape[1]] = prompt
  out = np.full((b, MAX_NEW), eos_id, np.int32)
  done = np.zeros(b, bool)
  for t in range(MAX_NEW):
    logits = forward(model, dict(image=image, text=text, prefix_len=prefix_len,
                                 text_len=prefix_len + t))
    token = np.asarray(jnp.argmax(logits[np.arange(b), prefix_len + t - 1], -1))
    out[:, t] = np.where(done, eos_id, token)
    done |= out[:, t] == eos_id
    text[np.arange(b), prefix_len + t] = token
  return out


def _make_context_matter(model):
  """A random tiny model with tied embeddings just repeats its last token; random
  final-norm signs and louder blocks make the next token depend on the context."""
  dec = model.decoder
  dec.norm.scale[...] = jax.random.normal(jax.random.key(0), dec.norm.scale.shape)
  for block in dec.blocks:
    block.attn.o.kernel[...] *= 4.0
    block.mlp.down.kernel[...] *= 4.0


def test_cached_greedy_decode_equals_full_forward_decode():
  config = tiny_config()
  model = build(config, seed=0)
  _make_context_matter(model)
  rng = np.random.default_rng(0)
  prefix_len = np.array([3, 8, 5], np.int32)  # ragged; row 1 fills the prompt buffer
  prompt = rng.integers(2, config.model.lm.vocab_size, (3, 8)).astype(np.int32)
  prompt[np.arange(8)[None] >= prefix_len[:, None]] = 0
  image = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  generate = nnx.jit(models.generate, static_argnames=('max_new_tokens', 'eos_id'))

  never = -1  # no token is eos: every row decodes all MAX_NEW tokens
  want = _reference(model, image, prompt, prefix_len, never)
  got = generate(model, image, prompt, prefix_len, max_new_tokens=MAX_NEW, eos_id=never)
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(want)) > 3  # more than one token per row: not a degenerate repeat

  # Row 0's second token as eos: each row stops at its first eos, then only eos.
  eos = int(want[0, 1])
  want = _reference(model, image, prompt, prefix_len, eos)
  got = generate(model, image, prompt, prefix_len, max_new_tokens=MAX_NEW, eos_id=eos)
  np.testing.assert_array_equal(got, want)
  assert (got[0, 1:] == eos).all()
