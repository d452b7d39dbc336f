"""Fine-tuning the sparse gate on a dense checkpoint: frozen params, metrics, eval, errors."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from configs import flash
from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.evaluation import runner
from flashmm_jax.models import gate
from flashmm_jax.training import sharding
from flashmm_jax.training import trainer
from tests import test_cli


def _config(arg='tiny', **train):
  c = flash.get_config(arg)
  c.train.update(dict(batch_size=8, total_steps=2, warmup_steps=1, log_every=1, ckpt_every=2),
                 **train)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.data.update(tasks=('vqa_color',), eval_examples=4)
  c.eval.update(batch_size=4, max_decode_len=3)
  return c


def _mesh(c):
  return sharding.make_mesh(c.mesh, devices=jax.devices()[:1])


def _flat(params):
  return {'/'.join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(jax.device_get(params))}


@pytest.fixture(scope='module')
def dense_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('dense')
  c = _config()
  t = trainer.Trainer(c, str(workdir), mesh=_mesh(c))
  t.save()  # an untrained dense checkpoint is enough to start from
  return workdir, _flat(t.params)


@pytest.fixture(scope='module')
def gate_run(dense_workdir, tmp_path_factory):
  dense_dir, _ = dense_workdir
  c = _config('tiny,sparse', total_steps=24, warmup_steps=2, log_every=8, ckpt_every=24,
              lr=1e-2, init_from=str(dense_dir))
  t = trainer.Trainer(c, str(tmp_path_factory.mktemp('gate')), mesh=_mesh(c))
  history = t.run()
  return c, t, history


def test_gate_fine_tune_learns_and_reports_sparsity(gate_run):
  c, _, history = gate_run
  first, last = history[0][1], history[-1][1]
  for key in ('gate/kl', 'lm_loss', 'sparsity/overall', 'sparsity/layer_0', 'sparsity/layer_1',
              'attn_flops_saved'):
    assert key in last, key
  assert last['gate/kl'] < 0.8 * first['gate/kl'], (first['gate/kl'], last['gate/kl'])
  assert last['loss'] < first['loss']
  assert 0.0 <= last['sparsity/overall'] <= 1.0
  assert c.train.trainable == 'gate' and c.model.sparse.enabled


def test_only_gate_params_change(dense_workdir, gate_run):
  _, dense_params = dense_workdir
  _, t, _ = gate_run
  tuned = _flat(t.params)
  gate_names = {n for n in tuned if gate.GATE_NAME in n.split('/')}
  assert gate_names and set(tuned) - gate_names == set(dense_params)
  for name, value in dense_params.items():
    np.testing.assert_array_equal(tuned[name], value, err_msg=name)  # restored, then frozen
  # Adam moments only for the gate: frozen params hold no optimizer state.
  gate_size = sum(tuned[n].size for n in gate_names)
  opt_size = sum(x.size for x in jax.tree.leaves(t.opt_state) if x.ndim)
  assert opt_size == 2 * gate_size


def test_eval_results_carry_sparsity_per_task(gate_run):
  c, t, _ = gate_run
  results = runner.evaluate(t.model(), c, tokenizer_lib.get_tokenizer(c.data.tokenizer))
  task = results['tasks']['vqa_color']
  assert {'sparsity/overall', 'sparsity/layer_0', 'attn_flops_saved'} <= set(task['sparsity'])
  assert 0.0 <= results['sparsity']['sparsity/overall'] <= 1.0
  assert '| sparsity |' in runner.results_markdown(results)
  # With sparse decode steps, their figures too (a column beside the prefill's).
  results['sparsity']['sparsity/decode'] = 0.25
  assert '| sparsity | decode sparsity |' in runner.results_markdown(results)
  assert '| **mean** | |' in runner.results_markdown(results)


def test_init_from_a_sparse_checkpoint_restores_the_gate_too(gate_run, tmp_path):
  c, t, _ = gate_run
  c = _config('tiny,sparse', init_from=str(t.workdir))
  again = trainer.Trainer(c, str(tmp_path), mesh=_mesh(c))
  assert again.step == 0
  want = _flat(t.params)
  for name, value in _flat(again.params).items():
    np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_init_from_a_mismatched_checkpoint_names_the_param(dense_workdir, tmp_path):
  dense_dir, _ = dense_workdir
  c = _config('tiny,sparse', init_from=str(dense_dir))
  c.model.lm.mlp_dim *= 2
  with pytest.raises(ValueError, match=r'mlp/down/kernel has shape \(256, 128\) in the '
                                       r'checkpoint but \(512, 128\)'):
    trainer.Trainer(c, str(tmp_path), mesh=_mesh(c))
  c = _config('tiny,sparse', init_from=str(dense_dir))
  c.model.lm.depth = 3
  with pytest.raises(ValueError, match=r'params missing from the checkpoint .*blocks/2'):
    trainer.Trainer(c, str(tmp_path), mesh=_mesh(c))


@pytest.mark.parametrize('arg,train,match', [
    ('tiny', dict(trainable='gate'), 'model has no sparse gate'),
    ('tiny,sparse', dict(gate_loss_weight=0.0), 'needs config.train.gate_loss_weight > 0'),
    ('tiny', dict(trainable='mlp'), "Unknown config.train.trainable 'mlp'"),
])
def test_bad_trainable_settings_are_named(tmp_path, arg, train, match):
  c = _config(arg, **train)
  with pytest.raises(ValueError, match=match):
    trainer.Trainer(c, str(tmp_path), mesh=_mesh(c))


def test_selection_rule_can_be_swept_on_one_gate(gate_run):
  c, t, _ = gate_run
  model = t.model()
  tokenizer = tokenizer_lib.get_tokenizer(c.data.tokenizer)
  sparsity, compiles = {}, {}
  for rule in (dict(threshold=0.0, coverage=0.0), dict(threshold=0.0, coverage=0.3),
               dict(threshold=0.0, coverage=0.6)):
    gate.set_selection(model, **rule)
    results = runner.evaluate(model, c, tokenizer)
    assert results['selection'] == dict(rule, top_k=0)
    sparsity[rule['coverage']] = results['sparsity']['sparsity/overall']
    compiles[rule['coverage']] = runner._decode._cache_size()  # pylint: disable=protected-access
  # Everything visible; the top 30% of each row's mass; the top 60%.
  assert sparsity[0.0] == 0.0 < sparsity[0.6] < sparsity[0.3]
  # Turning coverage on compiled anew; its value is state, so 0.6 reused 0.3's program.
  assert compiles[0.3] == compiles[0.0] + 1 and compiles[0.6] == compiles[0.3]
  with pytest.raises(ValueError, match=r"selection keys \['block_q'\] unknown"):
    gate.set_selection(model, block_q=8)
  with pytest.raises(ValueError, match='coverage=2.0'):
    gate.set_selection(model, coverage=2.0)


def test_joint_recipe_trains_the_whole_model(gate_run, tmp_path):
  _, t, _ = gate_run
  c = _config('tiny,sparse,joint', init_from=str(t.workdir))
  assert c.train.trainable == 'all' and c.model.sparse.enabled
  joint = trainer.Trainer(c, str(tmp_path), mesh=_mesh(c))
  history = joint.run()
  assert 'gate/kl' in history[-1][1]
  before, after = _flat(t.params), _flat(joint.params)
  changed = {n for n in before if not np.array_equal(before[n], after[n])}
  assert any(gate.GATE_NAME in n for n in changed)
  assert any('mlp' in n for n in changed)    # the LM trains through the sparse kernel


def test_eval_cli_sweeps_selection_rules(gate_run):
  _, t, _ = gate_run
  r = test_cli.run('eval.py', '--config=configs/flash.py:tiny,sparse', f'--workdir={t.workdir}',
                   '--config.data.tasks=vqa_color', '--config.data.eval_examples=4',
                   '--config.eval.batch_size=4', '--config.eval.max_decode_len=3',
                   '--sweep=threshold=0', '--sweep=threshold=0,coverage=0.3')
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ('threshold0.0', 'threshold0.0_coverage0.3'):
    assert (pathlib.Path(t.workdir) / 'eval' / name / 'results.json').exists(), name
  bad = test_cli.run('eval.py', '--config=configs/flash.py:tiny,sparse',
                     f'--workdir={t.workdir}', '--sweep=block_q=8')
  assert bad.returncode == 1 and "--sweep item 'block_q=8'" in bad.stderr
