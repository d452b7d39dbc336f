"""train.py and eval.py as a user runs them: tables, files, progress, one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/flash.py:tiny', '--config.train.total_steps=4',
        '--config.train.batch_size=8', '--config.train.warmup_steps=1',
        '--config.train.log_every=2', '--config.train.ckpt_every=2',
        '--config.data.eval_examples=3', '--config.eval.batch_size=8',
        '--config.eval.max_decode_len=6']


def run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cpu_flags.FAST_COMPILE)
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cli')
  r = run('train.py', *TINY, f'--workdir={workdir}', '--alsologtostderr')
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, r.stderr


def test_train_logs_progress_and_writes_checkpoints_and_tensorboard(trained_workdir):
  workdir, log = trained_workdir
  assert 'steps/s' in log and 'ETA' in log and 'tok/s' in log
  assert 'Start-up: train state ready after' in log and 'first step (trace, compile' in log
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['2', '4']
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))


def test_eval_prints_and_writes_the_12_task_table(trained_workdir):
  workdir, _ = trained_workdir
  r = run('eval.py', *TINY, f'--workdir={workdir}')
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert len(results['tasks']) == 12 and results['step'] == 4
  scores = [t['score'] for t in results['tasks'].values()]
  assert all(0.0 <= s <= 1.0 for s in scores)
  assert results['mean'] == pytest.approx(sum(scores) / 12)
  for t in results['tasks'].values():   # per example, for paired comparisons
    assert len(t['scores']) == t['n'] and sum(t['scores']) / t['n'] == pytest.approx(t['score'])
  md = (workdir / 'eval' / 'results.md').read_text()
  assert '| **mean** |' in md and '| ct_lesion |' in md
  assert '| vqa_count |' in r.stdout


def test_eval_under_noise_writes_its_own_file_where_out_says(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  r = run('eval.py', *TINY, f'--workdir={workdir}', '--noise=gaussian:3',
          '--config.data.tasks=("vqa_color","ct_lesion")', f'--out={tmp_path}/noisy')
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((tmp_path / 'noisy' / 'results_gaussian_3.json').read_text())
  assert results['noise'] == 'gaussian:3' and len(results['tasks']) == 2


@pytest.mark.parametrize('args, message', [
    (['--config=configs/flash.py:huge'], "Unknown variant 'huge'"),
    (['--config=configs/flash.py:tiny', '--config.train.total_stepz=3'], 'total_stepz'),
])
def test_bad_config_fails_with_a_clear_message(tmp_path, args, message):
  r = run('train.py', *args, f'--workdir={tmp_path}')
  assert r.returncode != 0
  assert message in r.stderr


def test_eval_without_checkpoint_is_one_line(tmp_path):
  r = run('eval.py', *TINY, f'--workdir={tmp_path}')
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith('error: no checkpoint found in')


def test_bad_noise_name_is_one_line(trained_workdir):
  workdir, _ = trained_workdir
  r = run('eval.py', *TINY, f'--workdir={workdir}', '--noise=fog:2')
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith('error:')
  assert 'fog' in r.stderr.strip().splitlines()[-1]
