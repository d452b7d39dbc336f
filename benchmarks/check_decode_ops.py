"""GPU check of the model's sparse decode seam: ops.sparse_attention.sparse_decode
with implementation 'auto' (on Hopper: the Mosaic kernel, mosaic_gpu_decode),
'mosaic' and 'triton' against 'reference', one new token, a prefix-LM mask with
ragged lengths, for a few head layouts and key blocks. Writes
$OUT/check_decode_ops.json: each output's relative error against the
reference's, and whether 'auto' lowered to a Mosaic GPU kernel.

  python benchmarks/check_decode_ops.py
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashmm_jax import ops  # noqa: E402
from flashmm_jax.ops.attention import MaskSpec  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402

# (batch, query heads, kv heads, cache length, head dim, block_k)
SHAPES = [(2, 16, 4, 4096, 128, 64), (3, 8, 8, 2048, 64, 128), (2, 32, 4, 4096, 128, 64)]
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


def main():
  res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__)
  for shape in SHAPES:
    res['x'.join(map(str, shape))] = row = check(*shape)
    print(shape, row, flush=True)
  with open(os.path.join(os.environ.get('OUT', '.'), 'check_decode_ops.json'), 'w') as f:
    json.dump(res, f, indent=1)


if __name__ == '__main__':
  main()
