"""The Pro teacher: the larger, slower model Flash distills from.

Same data, tokenizer and recipe as Flash; a wider and deeper shape at every size.
"""

from configs import common


def get_config(arg='tiny'):
  arg = common.parse_arg(arg, common.SIZE_DATA, runlocal=False, sparse=False, joint=False)
  c = common.base_config('pro', arg.variant, runlocal=arg.runlocal, sparse=arg.sparse,
                         joint=arg.joint)
  return c
