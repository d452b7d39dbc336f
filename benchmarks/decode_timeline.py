"""Where a chained decode step's GPU time goes, kernel by kernel, from JAX's
profiler (CUPTI's kernel records): each kernel's duration, the gap before it,
and the step's wall clock beside them, so the time no kernel covers (dispatch,
launch) shows. Nsight Compute runs each kernel alone and adds to its time (the
65% step's three kernels summed 61.9 us under it, 57.1 here; docs/results.md);
this runs them as a timed call does.

  python benchmarks/decode_timeline.py --decode 8x32768 --decode_chain 8 --out DIR

Per --decode shape, two paths: `ours` (attention.mosaic_decode_step at 65%,
attention.decode_case) and `cudnn` (attention.cudnn_decode_step), each as
--decode_chain steps chained in one program. The chained calls are timed in
alternation (--repeats rounds), then --traced calls of each run under the profiler,
each waited for. Writes DIR/decode_timeline.{json,md}: per path and kernel, how
many a step runs, its median duration and the median gap before it (from the
end of the kernel before it in the same call); a step's GPU-busy time (the
kernels' durations summed), its span (first start to last end) and its wall
clock, all per step of the chain.
"""

import glob
import os
import statistics
import sys
import tempfile

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import timing  # noqa: E402

_TRACED = flags.DEFINE_integer('traced', 3, 'profiled calls of each chained path')


def gpu_kernels(folder):
  """[(start_ns, duration_ns, name)] of the kernels on the GPU's streams in the
  profile JAX wrote under `folder`, by start."""
  (path,) = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
  data = jax.profiler.ProfileData.from_file(path)
  return sorted((e.start_ns, e.duration_ns, e.name)
                for plane in data.planes if plane.name.startswith('/device:GPU')
                for line in plane.lines if line.name.startswith('Stream')
                for e in line.events)


def profiled_kernels(run):
  """gpu_kernels of what run() puts on the GPU (it should wait for its work),
  traced by JAX's profiler into a temporary folder."""
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder):
      run()
    return gpu_kernels(folder)


def per_call(events, calls):
  """events cut into `calls` runs of equal length (each traced call runs the
  same kernels); a ValueError if they do not divide."""
  if not events or len(events) % calls:
    raise ValueError(f'{len(events)} GPU kernels do not divide into {calls} traced calls')
  n = len(events) // calls
  return [events[i * n:(i + 1) * n] for i in range(calls)]


def summarize(calls, chain):
  """Per kernel name: count a step, median duration and gap before it (us);
  and busy / span a step (us), medians over the calls."""
  us = lambda ns: ns / 1e3
  kernels = {}
  for call in calls:
    for i, (start, duration, name) in enumerate(call):
      k = kernels.setdefault(name, dict(durations=[], gaps=[]))
      k['durations'].append(duration)
      if i:
        k['gaps'].append(start - call[i - 1][0] - call[i - 1][1])
  table = {name: dict(per_step=len(k['durations']) / len(calls) / chain,
                      us=us(statistics.median(k['durations'])),
                      gap_us=us(statistics.median(k['gaps'])) if k['gaps'] else None)
           for name, k in kernels.items()}
  busy = statistics.median(sum(d for _, d, _ in call) for call in calls)
  span = statistics.median(call[-1][0] + call[-1][1] - call[0][0] for call in calls)
  return dict(kernels=table, busy_us=us(busy) / chain, span_us=us(span) / chain)


def trace(fn, args, calls):
  """gpu_kernels of `calls` calls of fn, each waited for, cut per call."""
  jax.block_until_ready(fn(*args))

  def run():
    for _ in range(calls):
      jax.block_until_ready(fn(*args))
  return per_call(profiled_kernels(run), calls)


def bench(batch, cache):
  args, budget, method = attention.decode_case(batch, cache)
  chain = attention._DECODE_CHAIN.value or 8
  steps = {'ours': attention.mosaic_decode_step(budget, method),
           'cudnn': attention.cudnn_decode_step}
  chained = {name: attention.chained(step, chain) for name, step in steps.items()}
  wall = timing.time_alternating(chained, *args, rounds=attention._REPEATS.value,
                                 iters=attention._ITERS.value)
  row = dict(batch=batch, cache=cache, block_k=attention._DECODE_BLOCK_K.value, select=method,
             chain=chain, paths={})
  for name, fn in chained.items():
    row['paths'][name] = summarize(trace(fn, args, _TRACED.value), chain)
    row['paths'][name]['wall_us'] = 1e3 * wall[name] / chain
  print(row)
  return row


def markdown(rows, env):
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: one decode step at 65% "
           f"sparsity, blocks of {rows[0]['block_k']} keys (selection inside) and cuDNN's, "
           "each chained in one program; "
           "kernel durations and gaps from JAX's profiler (CUPTI), medians over the "
           "traced calls, us a step", '',
           '| batch x cache | path | kernel | a step | us | gap before (us) |',
           '| --- | --- | --- | --- | --- | --- |']
  for r in rows:
    for path, p in r['paths'].items():
      for name, k in p['kernels'].items():
        gap = '' if k['gap_us'] is None else f"{k['gap_us']:.2f}"
        lines.append(f"| {r['batch']} x {r['cache']} | {path} | `{name[:60]}` "
                     f"| {k['per_step']:g} | {k['us']:.2f} | {gap} |")
      lines.append(f"| {r['batch']} x {r['cache']} | {path} | **busy / span / wall clock** "
                   f"| | {p['busy_us']:.1f} / {p['span_us']:.1f} / {p['wall_us']:.1f} | |")
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('decode_timeline',
                         [bench(*shape) for shape in attention.decode_shapes()], markdown)


if __name__ == '__main__':
  app.run(main)
