"""AdamW with linear warm-up and cosine decay, global-norm clipping."""

import jax
import optax


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


def make_optimizer(train_config):
  """Returns (optax transformation, schedule) for config.train."""
  c = train_config
  schedule = learning_rate_schedule(c)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, mask=_decay_mask),
  )
  return tx, schedule
