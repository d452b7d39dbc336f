"""The one training loop: data -> jitted step -> metrics, checkpoints, resume.

Data order is a pure function of the step (see data.pipeline.train_batches), and
params plus optimizer state are checkpointed together, so a run resumed from
step k continues exactly as the uninterrupted run would have.
"""

import json
import time

from absl import logging
from etils import epath
import jax

from flashmm_jax import models
from flashmm_jax.data import pipeline
from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.training import checkpoint
from flashmm_jax.training import flops
from flashmm_jax.training import optimizer
from flashmm_jax.training import progress
from flashmm_jax.training import sharding
from flashmm_jax.training import train_state


def _tensorboard_writer(workdir):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(str(epath.Path(workdir) / 'tb'))


def check_tokenizer_fits(config, tokenizer):
  if tokenizer.vocab_size > config.model.lm.vocab_size:
    raise ValueError(f'tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} ids but '
                     f'config.model.lm.vocab_size={config.model.lm.vocab_size}')


class Trainer:
  """Holds the mesh, state and step; `run()` trains to config.train.total_steps."""

  def __init__(self, config, workdir, mesh=None, eval_fn=None):
    t_init = time.time()
    checkpoint.check_writable(workdir)
    self.config, self.workdir, self.eval_fn = config, workdir, eval_fn
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    sharding.check_batch_divides(config.train.batch_size, self.mesh)
    self.tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer)
    check_tokenizer_fits(config, self.tokenizer)
    self.tx, self.schedule = optimizer.make_optimizer(config.train)
    with sharding.activate(self.mesh, config.logical_axis_rules):
      self.spec = train_state.make_state_spec(config, self.tx, self.mesh)
      self.step_fn = train_state.make_train_step(
          self.spec, self.tx, config.train.label_smoothing,
          gate_loss_weight=config.train.gate_loss_weight, trainable=config.train.trainable)
    self.manager = checkpoint.make_manager(workdir, keep=config.train.keep_ckpts)
    self.step, self.params, self.rest, self.opt_state = self._restore_or_init()
    logging.info('Start-up: train state ready after %.1f s', time.time() - t_init)

  def _restore_or_init(self):
    with sharding.activate(self.mesh, self.config.logical_axis_rules):
      if not self.manager.all_steps():
        return 0, *self._init()
      rest = train_state.init_rest(self.config)  # non-param state is not checkpointed
      p_sh, _, o_sh = self.spec.shardings
      step, params, opt_state, _ = checkpoint.restore_train_state(
          self.manager, train_state.abstract_with_shardings(self.spec.params, p_sh),
          train_state.abstract_with_shardings(self.spec.opt_state, o_sh))
    logging.info('Resumed from %s at step %d', self.manager.directory, step)
    return step, params, rest, opt_state

  def _init(self):
    """A fresh state, or one started from config.train.init_from (step 0)."""
    path = self.config.train.init_from
    if not path:
      return train_state.init_state(self.config, self.tx, self.spec)
    state = train_state.init_from_checkpoint(self.config, self.tx, self.spec, path)
    logging.info('Initialised params from %s', path)
    return state

  def model(self):
    return train_state.merge_model(self.spec, self.params, self.rest)

  def _meta(self):
    return {'step': self.step, 'config': json.loads(self.config.to_json_best_effort())}

  def save(self):
    if self.step not in self.manager.all_steps():
      checkpoint.save(self.manager, self.step, self.params, self.opt_state, self._meta())

  def run(self, num_steps=None):
    """Trains to config.train.total_steps, or `num_steps` further steps if given."""
    c = self.config
    stop = c.train.total_steps if num_steps is None else min(self.step + num_steps,
                                                              c.train.total_steps)
    n_img = models.num_image_tokens(c)
    tokens_per_step = c.train.batch_size * (n_img + c.data.max_text_len)
    flops_per_step = c.train.batch_size * flops.train_flops_per_example(c, n_img)
    writer = _tensorboard_writer(self.workdir)
    prog = progress.Progress(c.train.total_steps, self.step, tokens_per_step, flops_per_step,
                             writer=writer, is_main=jax.process_index() == 0)
    batches = pipeline.train_batches(c, self.tokenizer, start_step=self.step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    t_start = time.time()
    deadline = time.time() + 60 * c.train.max_time_minutes if c.train.max_time_minutes else None
    try:
      with sharding.activate(self.mesh, c.logical_axis_rules):
        first = True
        while self.step < stop:
          batch = sharding.global_batch(next(batches), self.mesh)
          t_batch = time.time()
          self.params, self.opt_state, metrics = self.step_fn(
              self.params, self.rest, self.opt_state, batch)
          if first:   # where start-up time goes: the data pipeline, or compiling
            jax.block_until_ready(metrics)
            logging.info('Start-up: first batch after %.1f s, first step (trace, compile, '
                         'run) %.1f s', t_batch - t_start, time.time() - t_batch)
            first = False
          self.step += 1
          prog.add(self.step, metrics)
          out_of_time = deadline is not None and time.time() > deadline
          self._at_boundaries(prog, writer, last=self.step == stop or out_of_time)
          if out_of_time:
            logging.info('Stopping at step %d: config.train.max_time_minutes=%s reached',
                         self.step, c.train.max_time_minutes)
            break
    finally:
      getattr(batches, 'close', lambda: None)()  # stops grain worker processes
      if writer is not None:
        writer.close()
    if jax.process_index() == 0 and prog.history:
      summary = progress.summarize(prog.history, self.step, time.time() - t_start)
      (epath.Path(self.workdir) / 'train_summary.json').write_text(json.dumps(summary, indent=2))
    return prog.history

  def _at_boundaries(self, prog, writer, last):
    """Logging, checkpointing and eval at their intervals (and always at the end)."""
    t = self.config.train
    save = self.step % t.ckpt_every == 0 or last
    if save or self.step % t.log_every == 0:
      prog.flush(self.step, self.schedule(self.step))  # raises on NaN, before any save
    if save:
      self.save()
    if self.eval_fn and t.eval_every and (self.step % t.eval_every == 0 or last):
      self._log_eval(writer)

  def _log_eval(self, writer):
    """Runs the eval hook (metric name -> value) and logs its scalars."""
    results = self.eval_fn(self.model())
    logging.info('eval at step %d: %s', self.step,
                 ', '.join(f'{k} {v:.3f}' for k, v in results.items()))
    if writer is not None:
      for k, v in results.items():
        writer.add_scalar(f'eval/{k}', v, self.step)


def train(config, workdir, eval_fn=None):
  """Trains (or resumes) in `workdir`; returns the logged metric history."""
  return Trainer(config, workdir, eval_fn=eval_fn).run()

