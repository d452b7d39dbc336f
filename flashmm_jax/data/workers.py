"""Running a grain pipeline in worker processes, with clean shutdown.

grain's process prefetch hands batches back in shared memory, which it frees
when an array dies, and stops its workers when the iterator is closed. Both
fail noisily when left to interpreter teardown, so batches are copied out
(cheap next to building them) and the workers are released on close(), when
the iterator is dropped, or at exit while the interpreter is still whole.
"""

import weakref

from absl import flags
import grain
import numpy as np


class WorkerBatches:
  """An iterator of plain-numpy batches produced by grain worker processes."""

  def __init__(self, iterator):
    self._held = [iterator]
    # finalize also runs at exit (atexit=True), before module teardown.
    self._finalizer = weakref.finalize(self, _release, self._held)

  def __iter__(self):
    return self

  def __next__(self):
    if not self._held:
      raise StopIteration
    batch = next(self._held[0])
    return {key: np.array(value) for key, value in batch.items()}

  def close(self):
    self._finalizer()


def _release(held):
  while held:
    held.pop().close()


def _ensure_absl_flags_parsed():
  # grain's worker pool reads an absl flag; outside absl.app (tests, notebooks)
  # flags are unparsed and that read raises. Marking them parsed keeps defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def prefetch_in_workers(stream, num_workers):
  """Runs an IterDataset of batch dicts in `num_workers` processes, in order."""
  if num_workers < 1:
    raise ValueError(f'num_workers must be >= 1 for worker prefetch, got {num_workers}')
  _ensure_absl_flags_parsed()
  options = grain.MultiprocessingOptions(num_workers=num_workers)
  return WorkerBatches(iter(stream.mp_prefetch(options)))
