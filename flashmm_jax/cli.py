"""Shared behaviour of the entry points: bad input ends in one line, exit code 1."""

import sys

from absl import logging

from flashmm_jax.training import progress

# Errors that describe bad input or state the user can fix; anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               progress.NonFiniteLossError)


def guarded(main):
  """Wraps an absl main so user errors print `error: ...` and exit 1."""

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      logging.flush()
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  return wrapped
