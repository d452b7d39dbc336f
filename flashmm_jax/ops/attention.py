"""The attention seam: every attention layer calls `attend` with a `MaskSpec`.

The mask travels as a few [B] vectors rather than a dense [B, T, S] array so
that block-sparse and fused kernels (registered here later) can skip whole
masked blocks instead of reading a mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashmm_jax.ops import partition
from flashmm_jax.ops import registry

_REGISTRY = registry.Registry('attention')
register = _REGISTRY.register
get = _REGISTRY.get


@struct.dataclass
class MaskSpec:
  """Which keys each query sees, as a prefix-LM with padding.

  Key j is visible to query i of batch row b iff
    j < kv_len[b] and (not causal or j < prefix_len[b] or j <= q_offset[b] + i).
  """
  q_offset: jax.Array    # [B] int32: absolute position of query 0.
  kv_len: jax.Array      # [B] int32: keys at positions >= kv_len are padding.
  prefix_len: jax.Array  # [B] int32: keys below this are visible to every query.
  causal: bool = struct.field(pytree_node=False)

  @classmethod
  def full(cls, batch, length):
    """Every query sees all `length` keys (the vision encoder)."""
    zeros = jnp.zeros((batch,), jnp.int32)
    return cls(q_offset=zeros, kv_len=zeros + length, prefix_len=zeros, causal=False)

  def dense(self, t, s):
    """bool [B, t, s]: True where query i may attend to key j."""
    i = jnp.arange(t)[None, :, None]
    j = jnp.arange(s)[None, None, :]
    col = lambda v: jnp.asarray(v, jnp.int32)[:, None, None]
    visible = j < col(self.kv_len)
    if self.causal:
      visible &= (j < col(self.prefix_len)) | (j <= col(self.q_offset) + i)
    return jnp.broadcast_to(visible, (visible.shape[0], t, s))


def attend(q, k, v, mask, *, implementation):
  """q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]; GQA when Hkv < Hq."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'attend wants q [B,T,H,D] and k, v [B,S,H,D] of one shape; '
                     f'got q {q.shape}, k {k.shape}, v {v.shape}')
  if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f'attend: batch or head_dim differ between q {q.shape} and k {k.shape}')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'attend: {q.shape[2]} query heads are not a multiple of '
                     f'{k.shape[2]} key/value heads')
  return get(implementation)(q, k, v, mask)


@register('xla')
def _xla(q, k, v, mask):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  # Grouping q by its kv head lets one k/v head serve its G query heads
  # without materialising G copies of k and v.
  q = q.reshape(b, t, hkv, hq // hkv, d)
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  logits *= 1.0 / np.sqrt(d)
  visible = mask.dense(t, s)[:, None, None]
  logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  # A row with no visible key would otherwise average all values; zero it.
  probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1), 0.0)
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, hq, d).astype(q.dtype)


@register('cudnn')
def _cudnn(q, k, v, mask):
  if jax.default_backend() != 'gpu':
    raise NotImplementedError(
        f"attention implementation 'cudnn' needs a GPU; backend is {jax.default_backend()!r}")
  if not mask.causal:
    # Pure padding masks map onto cuDNN's own sequence lengths: no mask tensor.
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=jnp.asarray(mask.kv_len, jnp.int32),
        implementation='cudnn')
  # cuDNN's causal mask is aligned at query 0 == key 0 and has no prefix, so a
  # prefix-LM or a decode step (q_offset > 0) goes in as a boolean mask, which
  # JAX turns into a [B, 1, T, S] bias. Correct, not yet block-skipping.
  # Every query must see at least one key here (true for the model's masks).
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask.dense(q.shape[1], k.shape[1])[:, None],
      implementation='cudnn')


@register('tokamax')
def _tokamax(q, k, v, mask):
  """tokamax's dot_product_attention (its FA3-style Mosaic kernel on Hopper).

  Like cuDNN it has no prefix-LM mask: causal masks go in as a dense mask. A
  Pallas kernel, so it runs per device shard (ops.partition).
  """
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("attention implementation 'tokamax' needs the tokamax "
                              'package (pip install tokamax)') from e

  def run(q, k, v, mask):
    if not mask.causal:
      return tokamax.dot_product_attention(
          q, k, v, key_value_seq_lengths=jnp.asarray(mask.kv_len, jnp.int32))
    return tokamax.dot_product_attention(q, k, v,
                                         mask=mask.dense(q.shape[1], k.shape[1])[:, None])

  return partition.per_shard(run, (q, k, v, mask), (partition.Q, partition.KV, partition.KV,
                                                    partition.PER_ROW), partition.Q)


def _tokamax_fits(q, k, mask):
  """Where tokamax's Mosaic kernel is known to compile and win: padding-only
  masks (it has no prefix-LM mask) on 128-multiple lengths. Its failures come
  at compile time (e.g. "dimension 3 must have size smaller or a multiple of
  its tiling 64, but got 304"), too late to fall back, so we check first."""
  return not mask.causal and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0


@register('auto')
def _auto(q, k, v, mask):
  """tokamax on a GPU where it is installed and fits, cuDNN otherwise; jnp on CPU/TPU."""
  if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
    if _tokamax_fits(q, k, mask):
      try:
        return _tokamax(q, k, v, mask)
      except NotImplementedError:
        pass
    return _cudnn(q, k, v, mask)
  return _xla(q, k, v, mask)
