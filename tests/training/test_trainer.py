"""The training loop on the CPU: learning, exact resume, sharding, NaN stop."""

import jax
import numpy as np
import pytest

from configs import flash
from flashmm_jax.training import progress
from flashmm_jax.training import sharding
from flashmm_jax.training import trainer


def tiny_config(**train):
  c = flash.get_config('tiny')
  c.train.update(dict(batch_size=8, total_steps=6, warmup_steps=2, log_every=3,
                      ckpt_every=3, lr=3e-3), **train)
  c.data.eval_examples = 4
  return c


def one_device_mesh(config):
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return sharding.make_mesh(config.mesh, devices=jax.devices()[:1])


def params_of(t):
  return jax.tree.leaves(jax.device_get(t.params))


def test_loss_falls_clearly_in_a_short_run(tmp_path):
  # The first 10 steps' mean loss against the last 10's (0.17x at 60 steps).
  c = tiny_config(total_steps=40, warmup_steps=5, log_every=10, ckpt_every=40, lr=3e-3,
                  batch_size=16)
  history = trainer.Trainer(c, str(tmp_path), mesh=one_device_mesh(c)).run()
  first, last = history[0][1]['loss'], history[-1][1]['loss']
  assert last < 0.6 * first, (first, last)
  assert {'steps_per_s', 'tokens_per_s', 'grad_norm', 'learning_rate'} <= set(history[-1][1])


def test_resumed_run_continues_exactly(tmp_path):
  c = tiny_config()
  straight = trainer.Trainer(c, str(tmp_path / 'a'), mesh=one_device_mesh(c))
  straight.run()

  first = trainer.Trainer(c, str(tmp_path / 'b'), mesh=one_device_mesh(c))
  first.run(num_steps=3)  # "interrupted" after the step-3 checkpoint
  resumed = trainer.Trainer(c, str(tmp_path / 'b'), mesh=one_device_mesh(c))
  assert resumed.step == 3
  resumed.run()
  assert resumed.step == straight.step == 6
  for a, b in zip(params_of(straight), params_of(resumed)):
    np.testing.assert_array_equal(a, b)
  assert sorted(resumed.manager.all_steps()) == [3, 6]


def test_one_and_eight_devices_give_the_same_loss(tmp_path):
  assert jax.device_count() == 8, 'conftest forces 8 CPU devices'
  c1 = tiny_config(total_steps=3, log_every=1, ckpt_every=100)
  h1 = trainer.Trainer(c1, str(tmp_path / 'one'), mesh=one_device_mesh(c1)).run()
  c8 = tiny_config(total_steps=3, log_every=1, ckpt_every=100)
  c8.mesh.update(data=2, fsdp=2, tensor=2)
  t8 = trainer.Trainer(c8, str(tmp_path / 'eight'))
  assert dict(t8.mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  sharded = [x for x in jax.tree.leaves(t8.params) if len(x.sharding.device_set) == 8]
  assert sharded, 'params should be spread over the mesh'
  h8 = t8.run()
  for (_, m1), (_, m8) in zip(h1, h8):
    np.testing.assert_allclose(m1['loss'], m8['loss'], rtol=2e-5)


def test_nan_loss_stops_naming_the_step_and_saves_nothing(tmp_path):
  c = tiny_config(lr=1e12, total_steps=40, warmup_steps=1, log_every=40, ckpt_every=40,
                  grad_clip=0.0)
  t = trainer.Trainer(c, str(tmp_path), mesh=one_device_mesh(c))
  with pytest.raises(progress.NonFiniteLossError, match=r'at step \d+'):
    t.run()
  assert not t.manager.all_steps()


def test_batch_must_divide_over_the_mesh(tmp_path):
  c = tiny_config(batch_size=6)
  c.mesh.update(data=4, fsdp=1, tensor=2)
  with pytest.raises(ValueError, match='batch_size=6 must divide'):
    trainer.Trainer(c, str(tmp_path))


def test_mesh_must_match_device_count():
  with pytest.raises(ValueError, match='needs 16 devices'):
    sharding.mesh_shape({'data': 4, 'fsdp': 4, 'tensor': 1}, 8)
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == (2, 2, 2)


def test_eval_hook_runs_at_its_interval_and_at_the_end(tmp_path):
  c = tiny_config(total_steps=5, eval_every=2, ckpt_every=100, log_every=100)
  calls = []

  def eval_fn(model):
    calls.append(model.decoder.vocab_size)
    return {'mean': 0.5}

  t = trainer.Trainer(c, str(tmp_path), mesh=one_device_mesh(c), eval_fn=eval_fn)
  t.run()
  assert len(calls) == 3  # steps 2, 4 and the last step, 5
