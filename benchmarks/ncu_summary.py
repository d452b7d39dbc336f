"""A table of Nsight Compute reports: each path's kernels in launch order.

  python benchmarks/ncu_summary.py OUT_STEM NAME=DETAILS.csv [NAME=DETAILS.csv ...]

DETAILS.csv: `ncu -i REPORT --page details --csv` of one path's profiled range
(benchmarks/profile_decode.py says how). Writes OUT_STEM.json and OUT_STEM.md:
per kernel its grid, duration, DRAM throughput (% of peak and TB/s), achieved
occupancy, registers, dynamic shared memory, the share of its cycles an SM was
busy (SM active / elapsed cycles) and local-memory spill requests; per path the
kernels' summed duration, which leaves out the gaps between launches.
"""

import csv
import json
import sys

# Metric name -> (key, scale to the unit in the key) for the units ncu prints.
_UNITS = {'us': 1.0, 'ms': 1e3, 'ns': 1e-3, 'usecond': 1.0, 'msecond': 1e3, 'nsecond': 1e-3,
          'Tbyte/s': 1.0, 'Gbyte/s': 1e-3, 'Mbyte/s': 1e-6,
          'Kbyte/block': 1.0, 'byte/block': 1e-3, 'Mbyte/block': 1e3, '%': 1.0,
          'register/thread': 1.0, 'cycle': 1.0, '': 1.0}
_METRICS = {
    ('GPU Speed Of Light Throughput', 'Duration'): 'us',
    ('GPU Speed Of Light Throughput', 'DRAM Throughput'): 'dram_pct',
    ('Memory Workload Analysis', 'Memory Throughput'): 'mem_tbps',
    ('Occupancy', 'Achieved Occupancy'): 'occupancy_pct',
    ('Launch Statistics', 'Registers Per Thread'): 'registers',
    ('Launch Statistics', 'Dynamic Shared Memory Per Block'): 'smem_kb',
    ('GPU Speed Of Light Throughput', 'Elapsed Cycles'): 'elapsed_cycles',
    ('GPU Speed Of Light Throughput', 'SM Active Cycles'): 'active_cycles',
    ('Memory Workload Analysis', 'Local Memory Spilling Requests'): 'spill_requests',
}


def _number(value, unit, where):
  if unit not in _UNITS:
    raise ValueError(f'{where}: unit {unit!r} is not one this summary converts')
  return float(value.replace(',', '')) * _UNITS[unit]


def read_kernels(path):
  """DETAILS.csv -> [{name, grid, us, dram_pct, ...}] in launch (ID) order."""
  kernels = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      if 'Kernel Name' not in row or row.get('ID') in (None, ''):
        raise ValueError(f'{path}: not an ncu --page details --csv export (no ID / Kernel Name)')
      k = kernels.setdefault(int(row['ID']), {'name': row['Kernel Name'],
                                              'grid': row['Grid Size'],
                                              'block': row['Block Size']})
      key = _METRICS.get((row['Section Name'], row['Metric Name']))
      if key:
        k[key] = _number(row['Metric Value'], row['Metric Unit'],
                         f'{path}, kernel {row["ID"]}, {row["Metric Name"]}')
  if not kernels:
    raise ValueError(f'{path}: no kernels in it (was the profiled range empty?)')
  for k in kernels.values():   # the share of the kernel's cycles an SM was busy, on average
    if k.get('elapsed_cycles'):
      k['sm_active_pct'] = 100 * k.get('active_cycles', 0.0) / k['elapsed_cycles']
  return [kernels[i] for i in sorted(kernels)]


def summarize(paths):
  """{name: csv path} -> {name: {'kernels': [...], 'total_us', 'launches'}}."""
  out = {}
  for name, path in paths.items():
    kernels = read_kernels(path)
    out[name] = dict(kernels=kernels, launches=len(kernels),
                     total_us=sum(k.get('us', 0.0) for k in kernels))
  return out


def _short(name, width=48):
  name = name.split('(')[0].removeprefix('void ')
  return name if len(name) <= width else name[:width - 3] + '...'


def markdown(summary):
  cell = lambda k, key, fmt: format(k[key], fmt) if key in k else ''
  lines = []
  for name, s in summary.items():
    lines += [f'### {name}: {s["launches"]} kernels, {s["total_us"]:.1f} us summed', '',
              '| kernel | grid | us | DRAM % | TB/s | occupancy % | registers | smem KB '
              '| SM active % | spill requests |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for k in s['kernels']:
      lines.append(f'| `{_short(k["name"])}` | {k["grid"]} | {cell(k, "us", ".2f")} | '
                   f'{cell(k, "dram_pct", ".1f")} | {cell(k, "mem_tbps", ".2f")} | '
                   f'{cell(k, "occupancy_pct", ".1f")} | {cell(k, "registers", ".0f")} | '
                   f'{cell(k, "smem_kb", ".1f")} | {cell(k, "sm_active_pct", ".0f")} | '
                   f'{cell(k, "spill_requests", ".0f")} |')
    lines.append('')
  return '\n'.join(lines)


def main(argv):
  if len(argv) < 3 or not all('=' in a for a in argv[2:]):
    raise SystemExit(__doc__)
  paths = dict(a.split('=', 1) for a in argv[2:])
  summary = summarize(paths)
  with open(argv[1] + '.json', 'w') as f:
    json.dump(summary, f, indent=1)
  with open(argv[1] + '.md', 'w') as f:
    f.write(markdown(summary))
  print(markdown(summary))


if __name__ == '__main__':
  main(sys.argv)
