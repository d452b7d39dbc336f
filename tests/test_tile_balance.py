"""benchmarks/tile_balance.py: the load model docs/results.md quotes for the
persistent forward's tile deal, on the CPU."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def balance(*flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  r = subprocess.run([sys.executable, 'benchmarks/tile_balance.py', '--shapes=4x32',
                      *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stdout


def test_the_batch_slowest_deal_overloads_a_cta_and_the_current_one_does_not():
  old = balance('--deal=batch_slowest')
  assert '| 4x32 | 1.0 | 331 | 256.0 | 277.0 | 1.195 |' in old
  assert '| 4x32 | 0.35 | 113 | 89.7 | 111.0 | 1.018 |' in old
  new = balance()
  assert '| 4x32 | 1.0 | 256 | 256.0 | 277.0 | 0.924 |' in new
  assert '| 4x32 | 0.35 | 90 | 89.7 | 111.0 | 0.811 |' in new
