"""Checkpoint restore and the errors for missing, corrupt and mismatched checkpoints."""

import hashlib
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import flash
from configs import pro
from flashmm_jax.training import checkpoint
from flashmm_jax.training import sharding
from flashmm_jax.training import train_state
from flashmm_jax.training import trainer


def _config(module):
  c = module.get_config('tiny')
  c.train.update(batch_size=8, total_steps=2, warmup_steps=1, log_every=1, ckpt_every=2)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def _mesh(c):
  return sharding.make_mesh(c.mesh, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  c = _config(flash)
  t = trainer.Trainer(c, str(workdir), mesh=_mesh(c))
  t.run()
  return workdir, jax.device_get(t.params)


def _digest(directory):
  h = hashlib.sha256()
  for f in sorted(pathlib.Path(directory).rglob('*')):
    if f.is_file():
      h.update(str(f.relative_to(directory)).encode() + f.read_bytes())
  return h.hexdigest()


def test_restore_model_gives_the_trained_params(trained):
  workdir, params = trained
  c = _config(flash)
  model, step, meta = train_state.restore_model(c, str(workdir), _mesh(c))
  assert step == 2 and meta['step'] == 2
  restored = jax.tree.leaves(jax.device_get(train_state.nnx.state(model, train_state.nnx.Param)))
  for a, b in zip(jax.tree.leaves(params), restored):
    np.testing.assert_array_equal(a, b)
  # A step directory works as well as a workdir.
  _, step, _ = train_state.restore_model(c, str(workdir / 'checkpoints' / '2'), _mesh(c))
  assert step == 2


def test_config_shape_mismatch_is_named_and_leaves_checkpoint_intact(trained):
  workdir, _ = trained
  before = _digest(workdir / 'checkpoints')
  wider = _config(flash)
  wider.model.lm.mlp_dim *= 2
  with pytest.raises(ValueError, match=r'mlp/down/kernel has shape \(256, 128\) in the '
                                       r'checkpoint but \(512, 128\) in the model'):
    train_state.restore_model(wider, str(workdir), _mesh(wider))
  deeper = _config(pro)
  with pytest.raises(ValueError, match=r'does not match the config: params missing .*blocks/2'):
    train_state.restore_model(deeper, str(workdir), _mesh(deeper))
  with pytest.raises(ValueError, match='does not match the config'):
    trainer.Trainer(deeper, str(workdir), mesh=_mesh(deeper))  # a failed resume
  assert _digest(workdir / 'checkpoints') == before


def test_one_host_saves_each_array_from_one_replica(tmp_path):
  # Replica-parallel saving cost a trainer test 21 s on 8 CPU devices (checkpoint.py).
  checkpoint.make_manager(str(tmp_path))
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert isinstance(handler, ocp.type_handlers.ArrayHandler)
  assert handler._use_replica_parallel is False   # pylint: disable=protected-access


def test_missing_checkpoint(tmp_path):
  c = _config(flash)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    train_state.restore_model(c, str(tmp_path / 'nowhere'), _mesh(c))
  with pytest.raises(FileNotFoundError, match='no checkpoint found'):
    train_state.restore_model(c, str(tmp_path), _mesh(c))


def test_corrupt_checkpoint_is_reported(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / 'copy'
  shutil.copytree(workdir / 'checkpoints', copy / 'checkpoints')
  for f in (copy / 'checkpoints' / '2' / 'params').rglob('*'):
    if f.is_file():
      f.write_bytes(b'\x00garbage' * 3)
  c = _config(flash)
  with pytest.raises(ValueError, match='corrupt or unreadable'):
    train_state.restore_model(c, str(copy), _mesh(c))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  c = _config(flash)
  with pytest.raises(PermissionError, match='is not writable'):
    trainer.Trainer(c, str(blocker / 'workdir'), mesh=_mesh(c))


def test_exported_params_restore_as_the_rounded_params_and_start_runs(trained, tmp_path):
  workdir, params = trained
  dst = tmp_path / 'bf16'
  assert checkpoint.export_params(str(workdir), str(dst)) == 2
  c = _config(flash)
  model, step, meta = train_state.restore_model(c, str(dst), _mesh(c))
  assert step == 2 and meta['exported_dtype'] == 'bfloat16'
  restored = jax.tree.leaves(jax.device_get(train_state.nnx.state(model, train_state.nnx.Param)))
  for a, b in zip(jax.tree.leaves(params), restored):
    assert b.dtype == a.dtype   # cast back to the model's param dtype
    np.testing.assert_array_equal(b, a.astype(jnp.bfloat16).astype(a.dtype))
  # A fresh run starts from it; resuming from it would need the optimizer state.
  c.train.init_from = str(dst)
  trainer.Trainer(c, str(tmp_path / 'ft'), mesh=_mesh(c)).run()
  with pytest.raises(FileExistsError, match='refusing to overwrite'):
    checkpoint.export_params(str(workdir), str(dst))
  with pytest.raises(ValueError, match="'opt_state' is missing"):
    trainer.Trainer(_config(flash), str(dst), mesh=_mesh(c))
