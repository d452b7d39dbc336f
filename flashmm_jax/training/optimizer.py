"""AdamW with linear warm-up and cosine decay, global-norm clipping; optional freezing."""

import jax
import optax

from flashmm_jax.models import gate

# config.train.trainable: which params the optimizer may change.
TRAINABLE = ('all', 'gate')


def learning_rate_schedule(train_config):
  c = train_config
  if c.warmup_steps >= c.total_steps:
    raise ValueError(f'config.train.warmup_steps={c.warmup_steps} must be below '
                     f'config.train.total_steps={c.total_steps}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=c.warmup_steps,
      decay_steps=c.total_steps, end_value=c.lr * c.min_lr_ratio)


def _decay_mask(params):
  # Norm scales and biases (rank < 2) are not decayed, as usual for transformers.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _is_gate(path):
  return any(getattr(k, 'key', None) == gate.GATE_NAME for k in path)


def trainable_mask(params, trainable):
  """A tree of bools like `params`: True where config.train.trainable lets it train."""
  if trainable not in TRAINABLE:
    raise ValueError(f'Unknown config.train.trainable {trainable!r}; valid: {list(TRAINABLE)}')
  if trainable == 'all':
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(lambda path, _: _is_gate(path), params)


def make_optimizer(train_config):
  """Returns (optax transformation, schedule) for config.train.

  Frozen params get zero updates and no Adam state; clipping and weight decay
  see only the trainable ones.
  """
  c = train_config
  schedule = learning_rate_schedule(c)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=_decay_mask),
  )
  trainable = c.get('trainable', 'all')
  trainable_mask({}, trainable)  # unknown names fail here, before any compute
  if trainable == 'all':
    return tx, schedule
  labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'freeze',
                                       trainable_mask(params, trainable))
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels), schedule
