"""Log lines with steps/s, tokens/s, MFU and ETA; TensorBoard scalars.

Per-step metrics stay on the device until a log boundary, so the loop never
waits on the host more than once per interval. The NaN check happens there too,
over every step of the interval, so the failing step is named exactly.
"""

import math
import time

from absl import logging
import jax
import numpy as np

# bf16 dense matmul peak measured on the lent devices (shared/MEASURED.md), by
# `device_kind`; MFU is reported only where the peak is known.
MEASURED_PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 805e12,
    'NVIDIA H200': 788e12,
}


class NonFiniteLossError(FloatingPointError):
  pass


def format_duration(seconds):
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Collects step metrics and reports them every `log_every` steps."""

  def __init__(self, total_steps, start_step, tokens_per_step, flops_per_step,
               writer=None, is_main=True):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak = MEASURED_PEAK_FLOPS.get(jax.devices()[0].device_kind)
    self.writer = writer
    self.is_main = is_main
    self.pending = []  # (step, device metrics)
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.history = []  # host metrics at each flush, for tests and summaries

  def add(self, step, metrics):
    self.pending.append((step, metrics))

  def flush(self, step, learning_rate):
    """Fetches pending metrics, checks them, logs means; returns them."""
    if not self.pending:
      return {}
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for s, m in zip(steps, fetched):
      if not math.isfinite(float(m['loss'])):
        raise NonFiniteLossError(f'loss is {float(m["loss"])} at step {s}; stopping '
                                 '(no checkpoint is written from this state)')
    now = time.perf_counter()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    means.update(steps_per_s=steps_per_s, tokens_per_s=steps_per_s * self.tokens_per_step,
                 learning_rate=float(learning_rate))
    if self.peak:
      means['mfu'] = steps_per_s * self.flops_per_step / (self.peak * jax.device_count())
    self.history.append((step, means))
    self._report(step, means)
    return means

  def _report(self, step, means):
    if not self.is_main:
      return
    eta = (self.total_steps - step) / max(means['steps_per_s'], 1e-9)
    mfu = f' | MFU {100 * means["mfu"]:.1f}%' if 'mfu' in means else ''
    logging.info('step %d/%d | loss %.4f | tok_acc %.3f%s | %.2f steps/s | %.1fk tok/s%s | ETA %s',
                 step, self.total_steps, means['loss'], means['token_accuracy'],
                 _sparse_part(means), means['steps_per_s'], means['tokens_per_s'] / 1e3, mfu,
                 format_duration(eta))
    if self.writer is not None:
      for k, v in means.items():
        self.writer.add_scalar(f'train/{k}', v, step)
      self.writer.flush()


def _sparse_part(means):
  """' | gate_kl .. | sparsity ..%' for a sparse-attention run, else ''."""
  part = f' | gate_kl {means["gate/kl"]:.4f}' if 'gate/kl' in means else ''
  if 'sparsity/overall' in means:
    part += f' | sparsity {100 * means["sparsity/overall"]:.1f}%'
  return part


def summarize(history, final_step, wall_seconds):
  """Run-level figures; throughput leaves out the first interval (compilation)."""
  steady = [m for _, m in history[1:]] or [m for _, m in history]
  keys = ('steps_per_s', 'tokens_per_s') + (('mfu',) if 'mfu' in steady[0] else ())
  summary = {f'median_{k}': float(np.median([m[k] for m in steady])) for k in keys}
  summary.update(final_step=final_step, wall_seconds=wall_seconds,
                 final_loss=history[-1][1]['loss'], jax_version=jax.__version__,
                 device_kind=jax.devices()[0].device_kind, device_count=jax.device_count())
  for k in ('sparsity/overall', 'gate/kl'):
    if k in history[-1][1]:
      summary[f'final_{k.replace("/", "_")}'] = history[-1][1][k]
  return summary
