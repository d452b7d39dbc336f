"""benchmarks/select_sweep.py's WARPSxROWSxSTAGES entries."""

import pytest

from benchmarks import select_sweep


def test_an_entry_names_the_three_settings():
  assert select_sweep.score_options('8x32x4') == dict(num_warps=8, rows_per_load=32,
                                                       num_stages=4)


@pytest.mark.parametrize('spec', ['8x32', '8x32x4x1', 'ax16x3'])
def test_a_malformed_entry_is_refused(spec):
  with pytest.raises(ValueError, match='WARPSxROWSxSTAGES'):
    select_sweep.score_options(spec)
