"""benchmarks/ncu_stalls.py on a hand-made `ncu --page source --csv` export:
stall samples summed by reason, the busiest instructions, and a clear error."""

import csv

import pytest

from benchmarks import ncu_stalls

COLUMNS = ['Address', 'Source', 'Warp Stall Sampling (All Samples)', 'Instructions Executed',
           'stall_barrier', 'stall_wait', 'stall_wait (Not Issued)']


def export(path, rows, first=('Kernel Name', 'body_kernel', '')):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f, quoting=csv.QUOTE_ALL)
    w.writerow(first)
    w.writerow(COLUMNS)
    w.writerows(rows)
  return str(path)


def test_sums_reasons_and_ranks_instructions(tmp_path):
  kernel, rows = ncu_stalls.read_sass(export(tmp_path / 's.csv', [
      ['0x7f00', 'HGMMA.64x128x16', '1,200', '10', '1,000', '200', '999'],
      ['0x7f10', 'MUFU.EX2 R1, R1', '300', '20', '0', '300', '5'],
      ['0x7f20', 'NOP', '', '30', '', '', '']]))
  s = ncu_stalls.summarize(rows, top=2)
  assert kernel == 'body_kernel'
  assert s['samples'] == 1500 and s['instructions_executed'] == 60
  # Not-issued columns are a subset of the samples: never added again.
  assert s['reasons'] == {'barrier': dict(samples=1000, share=1000 / 1500),
                          'wait': dict(samples=500, share=500 / 1500)}
  assert [(t['sass'], t['reason']) for t in s['top']] == [
      ('HGMMA.64x128x16', 'barrier'), ('MUFU.EX2 R1, R1', 'wait')]
  assert '| barrier | 1000 | 66.7% |' in ncu_stalls.markdown(kernel, s)


def test_a_details_export_is_refused(tmp_path):
  path = export(tmp_path / 'd.csv', [], first=('ID', 'Kernel Name', 'Metric Name'))
  with pytest.raises(ValueError, match='not an `ncu --page source'):
    ncu_stalls.read_sass(path)
