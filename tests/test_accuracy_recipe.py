"""benchmarks/sparse_accuracy_gpu.sh end to end on the CPU, at the tiny size: the
stages hand each other checkpoints and rules, the dense side runs beside the sparse
stages (FT_GPU) and then an ablated joint run (ABLATE), and the reports compare each
joint run against dense_ft."""

import json
import os
import pathlib
import subprocess
import sys
import time

from tests import cpu_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = 'threshold=0,coverage=0.6 threshold=0,coverage=0.5'
# One layer each side: the recipe's flow is under test, and each of its nine
# processes compiles its model.
FLAGS = ['--config.train.warmup_steps=1', '--config.train.batch_size=8',
         '--config.data.eval_examples=2', '--config.eval.batch_size=8',
         '--config.eval.max_decode_len=4', '--config.model.lm.depth=1',
         '--config.model.vision.depth=1']


def recipe(out, **env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=cpu_flags.FAST_COMPILE, TARGETS='mass',
             RULES=RULES, GATE_STEPS='2', JOINT_STEPS='2', NUM_WORKERS='0',
             PATH=f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}', **env)
  return subprocess.run(['bash', 'benchmarks/sparse_accuracy_gpu.sh', str(out),
                         'configs/flash.py:tiny', '2', *FLAGS],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_recipe_with_a_fixed_rule_no_gate_sweep_and_an_ablated_joint_run(tmp_path):
  (tmp_path / 'DONE').touch()  # left by an unpacked results archive: not this run's end
  # Trained under coverage 0.6, reported under 0.5 (SERVE_RULE).
  r = recipe(tmp_path, JOINT_RULE='threshold=0,coverage=0.6', GATE_EVAL='0', FT_GPU='0',
             ABLATE_FLAGS='--config.model.sparse.dense_text=False', ABLATE='1',
             SERVE_RULE='threshold=0,coverage=0.5')
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert (tmp_path / 'joint_rule').read_text().strip() == 'threshold0.0_coverage0.6'
  assert not (tmp_path / 'gate_mass' / 'eval').exists()      # GATE_EVAL=0
  assert (tmp_path / 'dense' / 'eval' / 'results.json').exists()
  sparsity = {}
  for arm in ('joint', 'joint_ablated'):
    for coverage in (0.6, 0.5):
      got = json.loads((tmp_path / arm / 'eval' / f'threshold0.0_coverage{coverage}' /
                        'results.json').read_text())
      assert got['selection']['coverage'] == coverage
      sparsity[arm, coverage] = got['sparsity']['sparsity/overall']
  # The joint recipe keeps the text rows dense (3/4 of a tiny sequence); ABLATE_FLAGS
  # reached the ablated run alone.
  assert 0 < sparsity['joint', 0.6] < sparsity['joint_ablated', 0.6]
  report = json.loads((tmp_path / 'sparse_accuracy.json').read_text())
  assert len(report['rows']) == 12
  assert report['summary']['sparsity']['sparsity/overall'] == sparsity['joint', 0.5]
  assert {c['model'] for c in report['curves']} == {'joint', 'joint_ablated'}
  ablated = json.loads((tmp_path / 'sparse_accuracy_ablated.json').read_text())
  assert ablated['summary']['sparsity']['sparsity/overall'] == sparsity['joint_ablated', 0.5]
  assert not list(tmp_path.glob('*/checkpoints'))             # removed at the end
  assert not list(tmp_path.glob('*.pid'))                     # nothing left running
  assert (tmp_path / 'DONE').exists()


def test_recipe_refuses_what_it_cannot_run_before_training(tmp_path):
  r = recipe(tmp_path, GATE_EVAL='0')
  assert r.returncode != 0 and 'set JOINT_RULE' in r.stdout
  r = recipe(tmp_path, JOINT_RULE='threshold=0,coverage=0.6', ABLATE='1')
  assert r.returncode != 0 and 'set FT_GPU and JOINT_RULE' in r.stdout
  r = recipe(tmp_path, JOINT_RULE='threshold=0,coverage=0.6', SERVE_RULE='threshold=0.3')
  assert r.returncode != 0 and 'SERVE_RULE=threshold=0.3 is not one of RULES' in r.stdout
  # The dense side of a run that died, still training into the same OUT (a live pid):
  # a second run would train beside it on its GPU.
  (tmp_path / 'side.pid').write_text(f'{os.getpid()}\n')
  (tmp_path / 'DONE').unlink()               # the refusals above ended runs of their own
  r = recipe(tmp_path, JOINT_RULE='threshold=0,coverage=0.6')
  assert r.returncode != 0 and 'still running (side.pid' in r.stdout
  assert not (tmp_path / 'dense').exists()   # refused before training anything
  assert not (tmp_path / 'DONE').exists()    # the earlier run's to write


def test_poll_on_a_machine_without_the_job_says_so_at_once(tmp_path):
  # A poll that lands on a fresh device machine must not wait out its seconds.
  r = subprocess.run(['bash', 'benchmarks/device_poll.sh', str(tmp_path / 'gone'),
                      str(tmp_path / 'gone.log'), '600', str(tmp_path)],
                     cwd=ROOT, capture_output=True, text=True, timeout=30)
  assert r.returncode == 1 and 'no job here' in r.stdout


def test_a_device_job_runs_from_its_own_copy_of_the_tree(tmp_path):
  # The next device call rewrites the tree under a running job: the job must not see it.
  repo, tree, log = tmp_path / 'repo', tmp_path / 'tree', tmp_path / 'job.log'
  (repo / '.git').mkdir(parents=True)
  (repo / 'data.txt').write_text('as launched\n')
  job = 'sleep 1; pwd; cat data.txt; echo "$PYTHONPATH"; ls -A; touch done'
  r = subprocess.run(['bash', str(ROOT / 'benchmarks/device_job.sh'), str(log), 'bash', '-c', job],
                     cwd=repo, env=dict(os.environ, JOB_TREE=str(tree), PYTHONPATH='/site'),
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  (repo / 'data.txt').write_text('rewritten by the next call\n')
  end = time.monotonic() + 30
  while not (tree / 'done').exists() and time.monotonic() < end:
    time.sleep(0.1)
  assert log.read_text().splitlines() == [str(tree), 'as launched', f'{tree}:/site', 'data.txt']
