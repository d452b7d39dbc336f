"""ops.partition: under a mesh the attention seams run each kernel on its device's
batch rows and heads (jax.shard_map), and give what they give on one device."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from flashmm_jax.ops import attention as attention_ops
from flashmm_jax.ops import partition
from flashmm_jax.ops import sparse_attention as sparse_ops
from flashmm_jax.training import sharding
from tests.pallas_kernels.sparse_attention_base import BlockSizes, Case, make_inputs


def _on_mesh(data, tensor):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=1, tensor=tensor)),
                            jax.devices()[:data * tensor])
  return sharding.activate(mesh, common.LOGICAL_AXIS_RULES)


def _seen_shapes(q, k, mask):
  """The shapes a recording kernel sees when per_shard runs it, jitted."""
  seen = []

  def kernel(q, k, mask):
    seen.append((q.shape, k.shape, mask.kv_len.shape))
    return q

  jax.jit(lambda q, k, mask: partition.per_shard(
      kernel, (q, k, mask), (partition.Q, partition.KV, partition.PER_ROW), partition.Q))(q, k, mask)
  return seen[-1]


def test_kernel_sees_its_devices_rows_and_heads():
  q, k, mask = jnp.zeros((8, 4, 8, 2)), jnp.zeros((8, 4, 2, 2)), attention_ops.MaskSpec.full(8, 4)
  with _on_mesh(4, 2):
    assert _seen_shapes(q, k, mask) == ((2, 4, 4, 2), (2, 4, 1, 2), (2,))
    # One kv head cannot split over tensor=2: q heads stay whole with it (GQA groups).
    assert _seen_shapes(q, k[:, :, :1], mask) == ((2, 4, 8, 2), (2, 4, 1, 2), (2,))
    # 6 rows over 4 devices: the rows stay whole, the heads still split.
    assert _seen_shapes(q[:6], k[:6], attention_ops.MaskSpec.full(6, 4)) == (
        (6, 4, 4, 2), (6, 4, 1, 2), (6,))
  assert _seen_shapes(q, k, mask) == ((8, 4, 8, 2), (8, 4, 2, 2), (8,))   # no mesh


def test_sharded_sparse_attend_matches_one_device_values_and_grads():
  case = Case('ragged_gqa2_rows4', 'random', (4, 2), (1.0, 0.64, 0.8, 0.5), (0.0, 0.3, 1.0, 0.5),
              seed=3)
  x = make_inputs(case, jnp.float32, 32, BlockSizes(32, 32), seq_blocks=2, batch=4)
  mask = attention_ops.MaskSpec(q_offset=jnp.zeros(4, jnp.int32), kv_len=x.kv_len,
                                prefix_len=x.prefix_len, causal=True)

  def value_and_grad(q):  # the Triton kernels in interpret mode, forward and backward
    loss = lambda q: jnp.sum(jnp.sin(sparse_ops.sparse_attend(
        q, x.k, x.v, mask, x.tables, block_sizes=x.block_sizes, implementation='triton')))
    return jax.jit(jax.value_and_grad(loss))(q)

  want = value_and_grad(x.q)
  with _on_mesh(2, 2):
    got = value_and_grad(x.q)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_sharded_sparse_decode_matches_one_device():
  rng = np.random.default_rng(0)
  b, hq, hkv, d, s, bk = 4, 4, 2, 16, 64, 16
  q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32) for _ in range(2))
  kv_len = jnp.array([64, 40, 17, 33], jnp.int32)
  mask = attention_ops.MaskSpec(q_offset=kv_len - 1, kv_len=kv_len,
                                prefix_len=jnp.zeros(b, jnp.int32), causal=True)
  kv_ids = jnp.asarray(np.sort(rng.permutation(4)[None, None, :3].repeat(b, 0).repeat(hkv, 1)),
                       jnp.int32)
  kv_count = jnp.full((b, hkv), 3, jnp.int32)
  run = jax.jit(lambda q: sparse_ops.sparse_decode(q, k, v, mask, kv_ids, kv_count, block_k=bk,
                                                   implementation='reference'))
  want = run(q)
  with _on_mesh(4, 2):
    got = run(q)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
