"""Where one kernel's warps wait: Nsight Compute's warp-stall samples, summed.

  ncu --section WarpStateStats --section SourceCounters --kernel-name regex:NAME \
      -o REPORT python ...
  ncu -i REPORT --page source --csv --print-source sass > SASS.csv
  python benchmarks/ncu_stalls.py OUT_STEM SASS.csv [--top N]

Writes OUT_STEM.json and OUT_STEM.md: the samples of each stall reason (all
warps: a producer warpgroup idling on its barriers counts too), and the N
instructions with the most samples, each with its SASS and its main reason.
"""

import argparse
import collections
import csv
import json


def _number(text):
  return float(text.replace(',', '')) if text else 0.0


def read_sass(path):
  """SASS.csv -> (kernel name, [row dict]) of one kernel's source page."""
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  if len(rows) < 3 or rows[0][:1] != ['Kernel Name'] or 'Source' not in rows[1]:
    raise ValueError(f'{path}: not an `ncu --page source --csv --print-source sass` export '
                     'of one kernel')
  return rows[0][1], [dict(zip(rows[1], r)) for r in rows[2:]]


def summarize(rows, top):
  reasons = [c for c in rows[0] if c.startswith('stall_') and '(Not Issued)' not in c]
  totals = collections.Counter()
  for r in rows:
    for c in reasons:
      totals[c[len('stall_'):]] += _number(r[c])
  samples = sum(totals.values())
  busiest = sorted(rows, key=lambda r: -_number(r['Warp Stall Sampling (All Samples)']))[:top]
  return dict(
      samples=samples,
      reasons={k: dict(samples=v, share=v / samples) for k, v in totals.most_common() if v},
      instructions_executed=sum(_number(r['Instructions Executed']) for r in rows),
      top=[dict(address=r['Address'], sass=r['Source'].strip(),
                samples=_number(r['Warp Stall Sampling (All Samples)']),
                reason=max(reasons, key=lambda c: _number(r[c]))[len('stall_'):])
           for r in busiest])


def markdown(kernel, s):
  lines = [f'### `{kernel}`: {s["samples"]:.0f} stall samples, '
           f'{s["instructions_executed"]:.0f} warp instructions executed', '',
           '| reason | samples | share |', '| --- | --- | --- |']
  lines += [f'| {k} | {v["samples"]:.0f} | {100 * v["share"]:.1f}% |'
            for k, v in s['reasons'].items()]
  lines += ['', '| address | SASS | samples | main reason |', '| --- | --- | --- | --- |']
  lines += [f'| {t["address"][-5:]} | `{t["sass"][:60]}` | {t["samples"]:.0f} | {t["reason"]} |'
            for t in s['top']]
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('out_stem')
  parser.add_argument('sass_csv')
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()
  kernel, rows = read_sass(args.sass_csv)
  s = summarize(rows, args.top)
  with open(args.out_stem + '.json', 'w') as f:
    json.dump(dict(kernel=kernel, **s), f, indent=1)
  with open(args.out_stem + '.md', 'w') as f:
    f.write(markdown(kernel, s))
  print(markdown(kernel, s))


if __name__ == '__main__':
  main()
