"""The Mosaic GPU block-sparse backward on a GPU: errors, then timings.

  python benchmarks/check_mosaic_backward.py [--modes check,time] [--seq 16384]

check: at a few small shapes, (dq, dk, dv) of mosaic_gpu_backward.backward
against triton_backward.backward and jax.vjp of the f32 jnp reference, all
from the Mosaic forward's out and lse; prints relative errors (Frobenius)
and stops on a mismatch.
time: at B=1, T=--seq, 16 query heads, GQA 4, head dim 128, bf16, causal with
a random --keeps fraction of each row's visible tiles (first and diagonal
blocks always kept), the median ms of the two backwards (out, lse and tables
precomputed), with the Mosaic forward and cuDNN's dense forward+backward for
scale. TFLOP/s counts 5 matmuls per computed tile (2.5x the forward's).
"""

import functools
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_backward  # noqa: E402
from pallas_kernels.sparse_attention import reference  # noqa: E402
from pallas_kernels.sparse_attention import triton  # noqa: E402
from pallas_kernels.sparse_attention import triton_backward  # noqa: E402

_MODES = flags.DEFINE_list('modes', ['check', 'time'], 'check and/or time')
_SEQ = flags.DEFINE_integer('seq', 16384, 'sequence length of the timings')
_KEEPS = flags.DEFINE_list('keeps', ['0.35', '0.65'], 'fractions of causal tiles kept')
_BLOCK_KS = flags.DEFINE_list('block_ks', ['64', '128'], 'block_k of the timings')
_ITERS = flags.DEFINE_integer('iters', 10, 'calls per timed batch')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed batches (median)')

BQ = mosaic_gpu_backward.TILE_Q
# (B, T, Hq, Hkv, D, block_k, kv_len, prefix_len, keep)
CHECK_SHAPES = (
    (1, 1024, 8, 2, 128, 64, [1024], [0], 0.5),
    (1, 1024, 8, 2, 128, 128, [1024], [0], 0.5),
    (2, 512, 4, 1, 64, 64, [512, 300], [0, 129], 0.6),
    (1, 768, 4, 4, 128, 64, [700], [200], 1.0),
    (1, 512, 8, 1, 128, 128, [512], [512], 0.4),
)


def causal_tables(b, t, hkv, block_k, keep, prefix=0, seed=0):
  """(block mask [B, Hkv, nQ, nK], tables): a random `keep` fraction of each
  row's visible tiles, plus the first block and those on the diagonal."""
  n_q, n_k = t // BQ, t // block_k
  q_first = np.arange(n_q)[:, None] * BQ
  k_first = np.arange(n_k)[None] * block_k
  visible = (k_first < q_first + BQ) | (k_first < prefix)
  forced = ((k_first >= q_first) & (k_first < q_first + BQ)) | (k_first == 0)
  rng = np.random.default_rng(seed)
  mask = ((rng.random((b, hkv, n_q, n_k)) < keep) & visible) | forced
  mask = jnp.asarray(mask)
  return mask, jax.jit(bt.build_block_tables)(mask)


def qkv(b, t, hq, hkv, d, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, t, hq, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.bfloat16)
  d_out = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
  return q, k, v, d_out


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


def triton_bwd(q, k, v, tables, kv_len, prefix, out, lse, d_out, sizes):
  st = triton.Static(sizes, q.shape[-1] ** -0.5, False, None, 2)
  return triton_backward.backward(q, k, v, tables, kv_len, prefix, out, lse, d_out,
                                  jnp.zeros_like(lse), st)


def check_backward_on_gpu():
  """Relative errors of the Mosaic backward against the Triton one and the
  reference; raises SystemExit on a mismatch (> 2e-2) or a non-finite value."""
  for i, (b, t, hq, hkv, d, bk, kv_len, prefix, keep) in enumerate(CHECK_SHAPES):
    q, k, v, d_out = qkv(b, t, hq, hkv, d, seed=i)
    mask, tables = causal_tables(b, t, hkv, bk, keep, prefix=max(prefix), seed=i)
    sizes = bt.BlockSizes(BQ, bk)
    kv_len, prefix = jnp.array(kv_len, jnp.int32), jnp.array(prefix, jnp.int32)
    out, lse = mosaic_gpu.sparse_attention_fwd(q, k, v, tables, kv_len, prefix,
                                               block_sizes=sizes)
    ours = mosaic_gpu_backward.backward(q, k, v, tables, kv_len, prefix, out, lse, d_out,
                                        block_sizes=sizes)
    f32 = lambda a: a.astype(jnp.float32)
    _, vjp = jax.vjp(lambda q, k, v: reference.reference_sparse_attention(
        q, k, v, mask, kv_len, prefix, block_sizes=sizes), f32(q), f32(k), f32(v))
    want = vjp(f32(d_out))
    try:
      theirs = triton_bwd(q, k, v, tables, kv_len, prefix, out, lse, d_out, sizes)
    except Exception as e:  # the Triton kernels: reported, the check goes on
      print(f'case {i}: triton backward failed: {type(e).__name__}: {str(e)[-300:]}')
      theirs = (None,) * 3
    line = []
    for n, g, r, tr in zip('qkv', ours, want, theirs):
      if not np.all(np.isfinite(np.asarray(g, np.float32))):
        raise SystemExit(f'case {i}: d{n} is not finite')
      err = rel_err(g, r)
      line.append(f'd{n} {err:.2e}')
      if tr is not None:
        line[-1] += f' (triton {rel_err(tr, r):.2e}, ours vs triton {rel_err(g, tr):.2e})'
      if not err < 2e-2:
        raise SystemExit(f'case {i}: d{n} mismatch, rel err {err:.2e}')
    print(f'check case {i} {(b, t, hq, hkv, d, bk)}: ' + '; '.join(line))


def time_ms(fn, *args):
  return timing.time_ms(fn, *args, iters=_ITERS.value, repeats=_REPEATS.value)


def time_backward(seq, block_k, keep, hq=16, hkv=4, d=128):
  """ms of the Mosaic and Triton backwards (and of the forward, cuDNN dense)."""
  q, k, v, d_out = qkv(1, seq, hq, hkv, d)
  _, tables = causal_tables(1, seq, hkv, block_k, keep)
  sizes = bt.BlockSizes(BQ, block_k)
  lens = jnp.array([seq], jnp.int32), jnp.array([0], jnp.int32)
  fwd = jax.jit(functools.partial(mosaic_gpu.sparse_attention_fwd, block_sizes=sizes))
  out, lse = fwd(q, k, v, tables, *lens)
  args = (q, k, v, tables, *lens, out, lse, d_out)
  res = dict(seq=seq, block_k=block_k, keep=keep, ms={})
  res['ms']['mosaic_fwd'] = time_ms(fwd, q, k, v, tables, *lens)
  res['ms']['mosaic_bwd'] = time_ms(jax.jit(functools.partial(
      mosaic_gpu_backward.backward, block_sizes=sizes)), *args)
  try:
    res['ms']['triton_bwd'] = time_ms(jax.jit(functools.partial(triton_bwd, sizes=sizes)),
                                      *args)
  except Exception as e:
    print(f'triton backward failed: {type(e).__name__}: {str(e)[-300:]}')
  try:
    dense = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                              implementation='cudnn')
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dense(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    res['ms']['cudnn_fwd'] = time_ms(jax.jit(dense), q, k, v)
    res['ms']['cudnn_fwd_bwd'] = time_ms(grad, q, k, v)
  except Exception as e:
    print(f'cudnn failed: {type(e).__name__}: {str(e)[:300]}')
  tiles = int(tables.kv_count.sum()) * (hq // hkv)
  res['bwd_tflops'] = 10 * BQ * block_k * d * tiles / res['ms']['mosaic_bwd'] / 1e9
  if 'triton_bwd' in res['ms']:
    res['mosaic_over_triton'] = res['ms']['mosaic_bwd'] / res['ms']['triton_bwd']
  print(res)
  return res


def main(_):
  print(dict(device=jax.devices()[0].device_kind, jax=jax.__version__))
  if 'check' in _MODES.value:
    check_backward_on_gpu()
  if 'time' in _MODES.value:
    for bk in map(int, _BLOCK_KS.value):
      for keep in map(float, _KEEPS.value):
        time_backward(_SEQ.value, bk, keep)


if __name__ == '__main__':
  app.run(main)
