"""The article's "common design": Flash's shape in bf16 with dense XLA attention.

Later optimisations (sparse attention, FP8/INT4, fused kernels) are measured
against this config, so it must stay the plain path.
"""

from configs import flash


def get_config(arg='tiny'):
  c = flash.get_config(arg)
  c.model.family = 'baseline'
  c.model.attention = 'xla'
  c.model.matmul = 'xla'
  c.model.dtype = 'bfloat16'
  return c
