"""Parameter count and size per component, from shapes only (nothing allocated).

  python -m flashmm_jax.summary --config=configs/flash.py:7b
"""

import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from flashmm_jax.models import multimodal

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/flash.py:7b.')

COMPONENTS = ('vision encoder', 'projector', 'LM embedding', 'LM attention', 'LM MLP', 'norms',
              'sparse gate')


def abstract_model(config):
  """FlashMM with ShapeDtypeStruct params: a 7B shape costs no memory."""
  return nnx.eval_shape(lambda: multimodal.FlashMM(
      config.model, config.data.image_size, rngs=nnx.Rngs(0)))


def component(path):
  """Which COMPONENTS entry a param path (a tuple of keys) belongs to."""
  if 'block_gate' in path:
    return 'sparse gate'
  if any('norm' in str(k) for k in path):
    return 'norms'
  if path[0] == 'vision':
    return 'vision encoder'
  if path[0] == 'projector':
    return 'projector'
  if path[-1] == 'embedding':
    return 'LM embedding'
  return 'LM attention' if 'attn' in path else 'LM MLP'


def count(config):
  """{component: number of params}; a shared param is counted once, where the LM holds it."""
  params = nnx.state(abstract_model(config), nnx.Param)
  counts = {c: 0 for c in COMPONENTS}
  for path, var in nnx.to_flat_state(params):
    counts[component(path)] += var.size
  return counts


def table(config):
  """Rows (component, params, bytes in param_dtype, bytes in bf16), then the total."""
  itemsize = jnp.dtype(config.model.param_dtype).itemsize
  counts = count(config)
  rows = [(c, n, n * itemsize, n * 2) for c, n in counts.items()
          if n or c != 'sparse gate']  # dense models have no gate row
  total = sum(counts.values())
  return rows + [('total', total, total * itemsize, total * 2)]


def main(argv):
  del argv
  config = _CONFIG.value
  m = config.model
  print(f'{m.family}:{m.size}  image {config.data.image_size}px, '
        f'{multimodal.num_image_tokens(config)} image tokens, param dtype {m.param_dtype}')
  print(f'{"component":<16}{"params":>16}{m.param_dtype:>14}{"bfloat16":>14}')
  for name, n, b, b16 in table(config):
    print(f'{name:<16}{n:>16,}{b / 1e9:>12.3f}GB{b16 / 1e9:>12.3f}GB')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
