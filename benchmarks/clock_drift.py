"""How much of a sparse-over-dense ratio is the GPU's state: one process times our
65% forward (persistent, selection inside) and tokamax's dense one several ways,
sampling the SM clock with nvidia-smi during each.

  python benchmarks/clock_drift.py --out DIR [--seqs 16384,8192]

Phases, in order: ours alone, tokamax alone, the two in alternation
(timing.time_alternating), ours against a second copy of itself in alternation,
ours alone again, and ours with 100 calls a batch. Writes clock_drift.json with
each phase's ms and the median and lowest SM clock (MHz) sampled during it.
Shape flags are attention.py's.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

from absl import app
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import timing  # noqa: E402


def sm_clocks(samples, stop):
  """Appends the SM clock (MHz) every 50 ms until stop is set."""
  while not stop.is_set():
    try:
      out = subprocess.run(['nvidia-smi', '--query-gpu=clocks.sm',
                            '--format=csv,noheader,nounits'],
                           capture_output=True, text=True).stdout.split()
    except FileNotFoundError:   # no NVIDIA driver here: no clock to sample
      return
    samples += [int(x) for x in out[:1] if x.isdigit()]
    time.sleep(0.05)


def phase(fn):
  """{ms: fn()'s result, sm_clock_median, sm_clock_min} over fn's run."""
  samples, stop = [], threading.Event()
  sampler = threading.Thread(target=sm_clocks, args=(samples, stop))
  sampler.start()
  ms = fn()
  stop.set()
  sampler.join()
  return dict(ms=ms, sm_clock_median=statistics.median(samples) if samples else None,
              sm_clock_min=min(samples, default=None))


def drift(seq):
  q, k, v = attention.make_inputs(seq)
  tokamax = attention.dense_baselines()['tokamax_mosaic']
  ours, ours2 = (attention.sparse_fn(0.35, seq, 0, 128, 2,
                                     persistent_ctas=attention.sm_count())[0] for _ in range(2))
  alone = lambda fn, **kw: lambda: timing.time_ms(fn, q, k, v, **kw)
  together = lambda fns: lambda: timing.time_alternating(fns, q, k, v, rounds=15)
  return {'ours': phase(alone(ours, repeats=15)),
          'tokamax': phase(alone(tokamax, repeats=15)),
          'ours_with_tokamax': phase(together({'ours': ours, 'tokamax': tokamax})),
          'ours_with_itself': phase(together({'ours': ours, 'ours2': ours2})),
          'ours_again': phase(alone(ours, repeats=15)),
          'ours_100_calls': phase(alone(ours, iters=100, repeats=5))}


def main(_):
  out = attention.FLAGS.value
  os.makedirs(out, exist_ok=True)
  rows = {}
  for seq in map(int, attention._SEQS.value):
    rows[seq] = drift(seq)
    print(seq, json.dumps(rows[seq]), flush=True)
  env = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=time.strftime('%Y-%m-%d'))
  with open(os.path.join(out, 'clock_drift.json'), 'w') as f:
    json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == '__main__':
  app.run(main)
