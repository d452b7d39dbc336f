"""benchmarks/ncu_summary.py on a hand-made `ncu --page details --csv` export:
kernels in launch order, units converted, per-path sums, and clear errors."""

import csv
import json

import pytest

from benchmarks import ncu_summary

HEADER = ['ID', 'Kernel Name', 'Block Size', 'Grid Size', 'Section Name', 'Metric Name',
          'Metric Unit', 'Metric Value']


def export(path, rows):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f, quoting=csv.QUOTE_ALL)
    w.writerow(HEADER)
    w.writerows(rows)
  return str(path)


def kernel(i, name, us, tbps, tbps_unit='Tbyte/s', smem=('1', 'Kbyte/block')):
  grid = ('(128, 1, 1)', '(8, 4, 4)')
  return [
      [i, name, *grid, 'GPU Speed Of Light Throughput', 'Duration', 'us', us],
      [i, name, *grid, 'GPU Speed Of Light Throughput', 'DRAM Throughput', '%', '75.5'],
      # The same metric name in another section, in %, must not be read as TB/s.
      [i, name, *grid, 'GPU Speed Of Light Throughput', 'Memory Throughput', '%', '80'],
      [i, name, *grid, 'Memory Workload Analysis', 'Memory Throughput', tbps_unit, tbps],
      [i, name, *grid, 'Launch Statistics', 'Dynamic Shared Memory Per Block', *smem[::-1]],
      [i, name, *grid, 'Launch Statistics', 'Registers Per Thread', 'register/thread', '168'],
      [i, name, *grid, 'GPU Speed Of Light Throughput', 'Elapsed Cycles', 'cycle', '3,130,837'],
      [i, name, *grid, 'GPU Speed Of Light Throughput', 'SM Active Cycles', 'cycle',
       '2,124,434.98'],
      [i, name, *grid, 'Memory Workload Analysis', 'Local Memory Spilling Requests', '',
       '3,698,432'],
  ]


def test_kernels_in_launch_order_with_units_and_sums(tmp_path):
  # Rows of kernel 1 before kernel 0: the ID, not the row order, is the launch order.
  rows = kernel(1, 'body_mosaic_gpu_kernel', '1,053.95', '3.62',
                smem=('167.06', 'Kbyte/block')) + kernel(0, 'loop_pad_fusion', '4.35', '12',
                                                         'Gbyte/s', ('512', 'byte/block'))
  summary = ncu_summary.summarize({'mosaic': export(tmp_path / 'm.csv', rows)})['mosaic']
  pad, body = summary['kernels']
  assert (pad['name'], body['name']) == ('loop_pad_fusion', 'body_mosaic_gpu_kernel')
  assert body['us'] == pytest.approx(1053.95) and pad['mem_tbps'] == pytest.approx(0.012)
  assert body['mem_tbps'] == pytest.approx(3.62) and body['dram_pct'] == 75.5
  assert pad['smem_kb'] == pytest.approx(0.512) and body['smem_kb'] == pytest.approx(167.06)
  assert summary['launches'] == 2 and summary['total_us'] == pytest.approx(1058.3)
  assert body['sm_active_pct'] == pytest.approx(67.855, abs=1e-3)
  assert body['spill_requests'] == 3698432
  assert '| 168 | 167.1 | 68 | 3698432 |' in ncu_summary.markdown({'mosaic': summary})
  assert '| `body_mosaic_gpu_kernel` | (8, 4, 4) | 1053.95 | 75.5 | 3.62 |' in (
      ncu_summary.markdown({'mosaic': summary}))


def test_main_writes_json_and_markdown(tmp_path):
  a = export(tmp_path / 'a.csv', kernel(0, 'cudnn_x', '126.98', '4.25'))
  ncu_summary.main(['ncu_summary.py', str(tmp_path / 'out'), f'cudnn={a}'])
  assert json.loads((tmp_path / 'out.json').read_text())['cudnn']['total_us'] == 126.98
  assert '### cudnn: 1 kernels, 127.0 us summed' in (tmp_path / 'out.md').read_text()


def test_bad_exports_are_named(tmp_path):
  with pytest.raises(ValueError, match='no kernels'):
    ncu_summary.read_kernels(export(tmp_path / 'empty.csv', []))
  odd = kernel(0, 'k', '1', '2', tbps_unit='furlong/s')
  with pytest.raises(ValueError, match="odd.csv, kernel 0, Memory Throughput: unit 'furlong/s'"):
    ncu_summary.read_kernels(export(tmp_path / 'odd.csv', odd))
  (tmp_path / 'other.csv').write_text('a,b\n1,2\n')
  with pytest.raises(ValueError, match='not an ncu --page details --csv export'):
    ncu_summary.read_kernels(str(tmp_path / 'other.csv'))
