"""The Flash student: the fast model the framework is built around.

Variants: tiny (CPU tests), small (one H100, minutes), base (~300M), 7b.
Usage: `python train.py --config=configs/flash.py:small --workdir=/tmp/flash`.
`small,sparse` fine-tunes a learned sparse-attention gate on a dense small
checkpoint: add `--config.train.init_from=DENSE_WORKDIR` (see README);
`small,sparse,joint` then trains the whole model through the sparse kernels
(init_from the gate's workdir).
"""

from configs import common


def get_config(arg='tiny'):
  arg = common.parse_arg(arg, common.SIZE_DATA, runlocal=False, sparse=False, joint=False)
  c = common.base_config('flash', arg.variant, runlocal=arg.runlocal, sparse=arg.sparse,
                         joint=arg.joint)
  return c
