"""When each CTA of the Mosaic decode kernel starts and ends, from Mosaic GPU's
profiler: one 65% decode step at --decode's shapes (attention.decode_case; the
selection runs before the kernel, untraced).

  python benchmarks/cta_spread.py --decode 8x32768 --out DIR

The kernel (mosaic_gpu_decode.sparse_decode with profile_dir) records each
warpgroup's named ranges with its SM (jax.named_scope in the kernel: `blocks`
is a loop over the CTA's slice; `Init` is the profiler's own). The trace is
written once a compiled kernel, so a first compile warms the GPU and a
second, traced into its own folder, runs after it. Times are the profiler's:
a warpgroup's first event at the global timer (ns), the rest that plus SM
cycles (%clock), so a CTA's ranges are in cycles: reported in thousands of
cycles (~1.95 GHz under load on an H200, Nsight Compute). Writes
DIR/cta_spread.{json,md}: per range, the begin / end / duration spread over
the CTAs (from the first begin of any range), and `busy`: the mean duration
over the span from that first begin to the last end, what the SMs' active
share would be if every SM held one CTA. An equal split that ends unevenly is
work the SMs that finish first cannot take over (docs/results.md).
"""

import collections
import glob
import json
import os
import sys
import tempfile

from absl import app
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402


def ranges(events):
  """{name: [(sm, trace, begin, end)]} of a Chrome trace's B/E events (one
  trace a warpgroup: `tid`; its SM + 1: `pid`)."""
  open_at, out = {}, collections.defaultdict(list)
  for e in events:
    key = (e['pid'], e['tid'], e['name'])
    if e['ph'] == 'B':
      open_at[key] = e['ts']
    elif e['ph'] == 'E' and key in open_at:
      out[e['name']].append((e['pid'] - 1, e['tid'], open_at.pop(key), e['ts']))
  return dict(out)


def spread(named):
  """Per range name: begin / end / duration (min, median, max, in the trace's
  unit / 1000 from the first begin of any range), how many, on how many SMs;
  and `busy`."""
  t0 = min(r[2] for rs in named.values() for r in rs)
  stats = lambda x: dict(min=float(np.min(x)), median=float(np.median(x)), max=float(np.max(x)))
  out = {}
  for name, rs in named.items():
    sm, _, begin, end = (np.array(c, np.float64) for c in zip(*rs))
    out[name] = dict(count=len(rs), sms=len(set(sm.tolist())), begin=stats(begin - t0),
                     end=stats(end - t0), duration=stats(end - begin),
                     busy=float(np.mean(end - begin) / (np.max(end) - t0)))
  return out


def trace_step(batch, cache, folder):
  args, budget, method = attention.decode_case(batch, cache)
  for sub in ('warm', 'traced'):
    path = os.path.join(folder, sub)
    os.makedirs(path, exist_ok=True)
    jax.block_until_ready(attention.mosaic_decode_step(budget, method, profile_dir=path)(*args))
  (trace,) = glob.glob(os.path.join(folder, 'traced', '*.json'))
  with open(trace) as f:
    events = json.load(f)['traceEvents']
  return dict(batch=batch, cache=cache, select=method, ranges=spread(ranges(events)))


def markdown(rows, env):
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: the Mosaic decode kernel "
           "at 65%, one traced call after a warm one (Mosaic GPU profiler; its timing "
           "adds a little to each range). Thousands of SM cycles from the first begin "
           "(a CTA's start by the global timer): min / median / max",
           '', '| batch x cache | range | CTAs (SMs) | begin | end | duration | busy |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    for name, s in r['ranges'].items():
      cell = lambda k: '{min:.1f} / {median:.1f} / {max:.1f}'.format(**s[k])
      lines.append(f"| {r['batch']} x {r['cache']} | `{name}` | {s['count']} ({s['sms']}) "
                   f"| {cell('begin')} | {cell('end')} | {cell('duration')} "
                   f"| {100 * s['busy']:.0f}% |")
  return '\n'.join(lines) + '\n'


def main(_):
  with tempfile.TemporaryDirectory() as folder:
    rows = [trace_step(b, c, os.path.join(folder, f'{b}x{c}'))
            for b, c in attention.decode_shapes()]
  attention.write_report('cta_spread', rows, markdown)


if __name__ == '__main__':
  app.run(main)
