"""benchmarks/clock_drift.py's phases: the timed result, and the SM clock where
nvidia-smi can be asked (None where it cannot, as on this CPU machine)."""

import shutil
import time

from benchmarks import clock_drift


def test_a_phase_returns_the_result_and_the_clock_it_saw():
  got = clock_drift.phase(lambda: (time.sleep(0.12), 1.5)[1])
  assert got['ms'] == 1.5
  if shutil.which('nvidia-smi') is None:
    assert got['sm_clock_median'] is None and got['sm_clock_min'] is None
  else:
    assert got['sm_clock_min'] <= got['sm_clock_median']
