"""Next-token cross-entropy on the answer tokens (the prefix is context, not target)."""

import jax
import jax.numpy as jnp
import optax


def answer_cross_entropy(logits, text, target_mask, label_smoothing=0.0):
  """Mean CE of predicting text[t+1] from position t, over target_mask[t+1] tokens.

  Returns (loss, metrics) with the loss and token accuracy over answer tokens.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = text[:, 1:]
  weights = target_mask[:, 1:].astype(jnp.float32)
  vocab = logits.shape[-1]
  labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
  per_token = optax.softmax_cross_entropy(logits, labels)
  count = jnp.maximum(weights.sum(), 1.0)
  loss = (per_token * weights).sum() / count
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  metrics = {
      'loss': loss,
      'token_accuracy': (correct * weights).sum() / count,
      'answer_tokens': weights.sum(),
  }
  return loss, metrics
