"""Wall-clock timing of jitted GPU calls, shared by the benchmark scripts."""

import statistics
import time

import jax


def time_ms(fn, *args, iters=20, repeats=5):
  """Median over `repeats` of the mean per-call ms of `iters` queued calls.

  Queued calls keep the device busy between launches (dispatch is async), so
  the mean per call is device time once the first call has compiled.
  """
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(runs)


def time_alternating(fns, *args, rounds, iters=20):
  """{name: median ms} of each fn over `rounds` batches of `iters` calls, the
  fns timed in turn each round, so that the GPU's drift hits them all alike
  (comparing versions of one kernel across runs does not survive it)."""
  runs = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      runs[name].append(time_ms(fn, *args, iters=iters, repeats=1))
  return {name: statistics.median(t) for name, t in runs.items()}
