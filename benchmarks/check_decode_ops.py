"""GPU check of the model's sparse decode seam: ops.sparse_attention.sparse_decode
with implementation 'auto' (on Hopper: the Mosaic kernel, mosaic_gpu_decode),
'mosaic' and 'triton' against 'reference', one new token, a prefix-LM mask with
ragged lengths, for a few head layouts and key blocks; then the whole model's
decode loop (check_model). Writes $OUT/check_decode_ops.json: each output's
relative error against the reference's, and whether 'auto' lowered to a
Mosaic GPU kernel.

  python benchmarks/check_decode_ops.py [--model_only]
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import flash  # noqa: E402
from flashmm_jax import models  # noqa: E402
from flashmm_jax import ops  # noqa: E402
from flashmm_jax.models import decode  # noqa: E402
from flashmm_jax.ops.attention import MaskSpec  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402

# (batch, query heads, kv heads, cache length, head dim, block_k)
SHAPES = [(2, 16, 4, 4096, 128, 64), (3, 8, 8, 2048, 64, 128), (2, 32, 4, 4096, 128, 64),
          (2, 16, 4, 4096, 128, 128)]   # block_k 128 at head dim 128
IMPLS = ('reference', 'auto', 'mosaic', 'triton')


def check(b, hq, hkv, s, d, bk):
  keys = jax.random.split(jax.random.PRNGKey(s + d), 4)
  q = jax.random.normal(keys[0], (b, 1, hq, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.bfloat16)
  n_k = s // bk
  ids, count = bt.tables_from_scores(jax.random.normal(keys[3], (b, hkv, n_k)),
                                     jnp.full((b, hkv), n_k // 3, jnp.int32), n_k // 3)
  kv_len = jnp.array([s - 7 - 100 * i for i in range(b)], jnp.int32)
  mask = MaskSpec(q_offset=kv_len - 1, kv_len=kv_len,
                  prefix_len=jnp.full((b,), 300, jnp.int32), causal=True)

  def step(impl):
    return jax.jit(lambda q, k, v, ids, count: ops.sparse_attention.sparse_decode(
        q, k, v, mask, ids, count, block_k=bk, implementation=impl))
  out = {impl: np.asarray(step(impl)(q, k, v, ids, count), np.float32) for impl in IMPLS}
  row = {impl: float(np.linalg.norm(o - out['reference']) / np.linalg.norm(out['reference']))
         for impl, o in out.items()}
  row['auto_is_mosaic'] = 'mosaic_gpu' in step('auto').lower(q, k, v, ids, count).as_text()
  return row


def model_config(size, image_size, kernel, sparse=True, attention='auto'):
  """`size` at image_size px (256: 1024 image tokens), random weights. sparse:
  its gate decides decode steps too (model.sparse.decode) through `kernel`;
  else dense, through model.attention."""
  c = flash.get_config(f'{size},sparse')
  c.data.image_size = image_size
  c.model.attention = attention
  # The Mosaic kernels' tiles (SPARSE_BLOCKS' small ones would take Triton's).
  c.model.sparse.update(enabled=sparse, kernel=kernel, decode=sparse, block_q=128, block_k=64)
  return c


def teacher_forced(config, params, inputs, steps, fed=None):
  """Prefill and `steps` one-token steps -> (logits [steps + 1, B, V], whether
  the prefill and the step lowered to Mosaic GPU kernels). Step t is fed the
  argmax of fed[t] (default: its own logits, greedy decoding)."""
  image, text, prefix_len = inputs
  model = models.FlashMM(config.model, config.data.image_size, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  graphdef, state = nnx.split(model)
  prefill = jax.jit(lambda state, *a: decode._prefill(nnx.merge(graphdef, state), *a))
  step = jax.jit(lambda state, *a: decode._step(nnx.merge(graphdef, state), *a))
  is_mosaic = lambda fn, *a: 'mosaic_gpu' in fn.lower(*a).as_text()
  n = model.num_image_tokens
  cache = models.init_cache(model, text.shape[0], n + text.shape[1] + steps)
  lowered = dict(prefill=is_mosaic(prefill, state, image, text, prefix_len, cache))
  out, cache = prefill(state, image, text, prefix_len, cache)
  every, prefix = [out], n + prefix_len
  for t in range(steps):
    token = jnp.argmax(out if fed is None else fed[t], -1).astype(jnp.int32)
    args = (state, token, prefix + t, prefix, cache)
    lowered.setdefault('step', is_mosaic(step, *args))
    out, cache = step(*args)
    every.append(out)
  return np.asarray(jnp.stack(every), np.float32), lowered


def check_model(batch=4, steps=12, image_size=256, size='small'):
  """The whole model's decode loop with model.sparse.kernel 'auto' against
  'reference' on the same weights. The gate selects in XLA in both, so only
  the attention kernels differ; 'auto' is fed the reference's greedy tokens,
  so one near-tie cannot fork the runs. The same for the dense model, its
  'auto' attention against 'xla': the gap two correct kernels leave in this
  bf16 model. Per pair: the logits' relative error, the share of positions
  whose argmax agrees, and which prefill / step lowered to Mosaic GPU kernels."""
  pairs = {'sparse': (model_config(size, image_size, 'reference'),
                      model_config(size, image_size, 'auto')),
           'dense': (model_config(size, image_size, 'reference', False, 'xla'),
                     model_config(size, image_size, 'reference', False, 'auto'))}
  rng = np.random.default_rng(0)
  c = pairs['sparse'][0]
  length, vocab = c.data.max_text_len, c.model.lm.vocab_size
  inputs = (jnp.asarray(rng.integers(0, 256, (batch, image_size, image_size, 3)), jnp.uint8),
            jnp.asarray(rng.integers(2, vocab, (batch, length)), jnp.int32),
            jnp.asarray(rng.integers(length // 2, length, batch), jnp.int32))
  res = dict(batch=batch, steps=steps, image_size=image_size)
  for name, (ref_config, config) in pairs.items():
    params = nnx.state(models.FlashMM(ref_config.model, image_size, rngs=nnx.Rngs(0)), nnx.Param)
    want, want_lowered = teacher_forced(ref_config, params, inputs, steps)
    got, lowered = teacher_forced(config, params, inputs, steps, fed=want)
    res[name] = dict(logits_rel_err=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
                     argmax_agree=float((got.argmax(-1) == want.argmax(-1)).mean()),
                     mosaic=lowered, reference_mosaic=want_lowered)
  return res


def main():
  res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
  if '--model_only' not in sys.argv:
    for shape in SHAPES:
      res['x'.join(map(str, shape))] = row = check(*shape)
      print(shape, row, flush=True)
  res['model'] = check_model()
  print('model', res['model'], flush=True)
  with open(os.path.join(os.environ.get('OUT', '.'), 'check_decode_ops.json'), 'w') as f:
    json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
