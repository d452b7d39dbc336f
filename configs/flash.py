"""The Flash student: the fast model the framework is built around.

Variants: tiny (CPU tests), small (one H100, minutes), base (~300M), 7b.
Usage: `python train.py --config=configs/flash.py:small --workdir=/tmp/flash`.
"""

from configs import common


def get_config(arg='tiny'):
  arg = common.parse_arg(arg, common.SIZE_DATA, runlocal=False)
  c = common.base_config('flash', arg.variant, runlocal=arg.runlocal)
  return c
