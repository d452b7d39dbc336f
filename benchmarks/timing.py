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
