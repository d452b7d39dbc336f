"""gate_step: a decode step's learned gate up to its logits in one kernel
(Triton interpreter) against its plain-jnp reference, that reference against
the model's own XLA path (BlockGate.fold_keys + _decode_logits), and the gate's
whole step (step_tables: this kernel, then gate_select's) through its seam. The
GPU lowering is in test_lowering.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from flashmm_jax import ops
from flashmm_jax.models import gate
from flashmm_jax.models import layers
from flashmm_jax.ops import sparse_gate as sg
from flashmm_jax.training import sharding
from pallas_kernels.sparse_attention import gate_step as gs
from tests.pallas_kernels.test_gate_select import kept_sets

BLOCK_K, ROPE_BASE = 16, 10000.0


def _case(seed, b=3, hkv=2, group=4, d=32, n_k=24, g_dim=16):
  """Random inputs: row 0 mid-block near the end, row 1 on a block's first
  position (its block empty before), row 2 padding (q_offset past kv_len)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, hkv, group, d), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, hkv, d), jnp.float32).astype(jnp.bfloat16)
  stats = tuple(jax.random.normal(ks[2 + i], (b, n_k, hkv, d), jnp.float32) for i in range(3))
  gate_key = jax.random.normal(ks[5], (b, hkv, n_k, g_dim), jnp.float32)
  w = jax.random.normal(ks[6], ((hkv * group * d + hkv * 3 * d) * g_dim,), jnp.float32) * 0.1
  q_proj_t = w[:hkv * group * d * g_dim].reshape(hkv, group, g_dim, d)
  k_proj_t = w[hkv * group * d * g_dim:].reshape(hkv, g_dim, 3 * d)
  q_offset = jnp.array([n_k * BLOCK_K - 5, 5 * BLOCK_K, 40][:b])
  kv_len = jnp.array([n_k * BLOCK_K - 4, 5 * BLOCK_K + 1, 30][:b])
  freq = layers.rope_frequencies(g_dim, ROPE_BASE)
  return q, k, stats, gate_key, q_proj_t, k_proj_t, q_offset, kv_len, freq


def _assert_close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape, chunk', [
    (dict(), 8),                                # 3 programs a row
    (dict(group=1, n_k=16), 16),                # group 1, one program a row
    (dict(group=8, d=16, n_k=20, g_dim=32), 4), # group 8, 5 programs a row
    (dict(group=2, n_k=24), None),              # launch's chunk
    (dict(group=3), 8),                         # group 3: logits of 4 heads, the last 0
])
def test_kernel_equals_its_reference(shape, chunk):
  args = _case(3, **shape)
  got = gs.decode_logits(*args, block_k=BLOCK_K, chunk=chunk, interpret=True)
  want = gs.decode_logits_reference(*args, block_k=BLOCK_K)
  group = args[0].shape[2]
  assert got[0].shape[2] == 1 << (group - 1).bit_length()
  np.testing.assert_array_equal(got[0][:, :, group:], 0.0)
  _assert_close((got[0][:, :, :group], *got[1:]), want)
  stats, gate_key = args[2], args[3]
  # Row 2 (padding) changes nothing; rows 0 and 1 their block's entries only.
  for new, old in zip(got[1] + (got[2],), stats + (gate_key,)):
    np.testing.assert_array_equal(new[2], old[2])
  assert not np.allclose(got[2][1, :, 5], gate_key[1, :, 5])
  np.testing.assert_array_equal(np.delete(got[2][1], 5, axis=1), np.delete(gate_key[1], 5, 1))


def test_the_new_block_of_an_empty_block_pools_the_one_key():
  """A token on a block's first position: the block's max, min and mean are the key."""
  q, k, stats, *rest = _case(5)
  empty = sg.empty_key_stats(3, 24, 2, 32)
  stats = tuple(x.at[1, 5].set(empty[name][1, 5]) for x, name in zip(stats, sg.KEY_STATS))
  _, new, _ = gs.decode_logits(q, k, stats, *rest, block_k=BLOCK_K, chunk=8, interpret=True)
  for x in new:
    np.testing.assert_array_equal(x[1, 5], k[1].astype(jnp.float32))


def _gate(hq=8, hkv=2, d=32, g_dim=16):
  cfg = common.base_config('flash', 'tiny').model
  cfg.sparse.update(enabled=True, decode=True, block_k=BLOCK_K, gate_dim=g_dim, threshold=0.05,
                    top_k=7, coverage=0.8)
  g = gate.BlockGate(hq, hkv, d, cfg, ROPE_BASE, rngs=nnx.Rngs(0))
  g.q_proj[...] = g.q_proj[...] * 8.0   # peaked gate probabilities: no near-ties
  return g


def _model_cache(g, seed, b=3, n_k=24):
  """A cache whose gate entries hold random keys folded by the model (a
  prefill of every position < q_offset), and a step's q_raw, k_raw, mask."""
  ks = jax.random.split(jax.random.key(seed), 3)
  s, hkv, d = n_k * BLOCK_K, g.num_kv_heads, g.head_dim
  q_offset = jnp.array([s - 5, 5 * BLOCK_K, 40][:b])
  kv_len = jnp.array([s - 4, 5 * BLOCK_K + 1, 30][:b])   # row 2: padding
  keys = jax.random.normal(ks[0], (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
  cache = dict(k=jnp.zeros((b, s, hkv, d), jnp.bfloat16), **g.empty_key_stats(b, s))
  prefill = ops.attention.MaskSpec(q_offset=jnp.zeros(b, jnp.int32), kv_len=q_offset,
                                   prefix_len=jnp.zeros(b, jnp.int32), causal=True)
  cache = g.fold_keys(cache, keys, prefill)
  q_raw = jax.random.normal(ks[1], (b, 1, hkv * g.group, d), jnp.float32).astype(jnp.bfloat16)
  k_raw = jax.random.normal(ks[2], (b, 1, hkv, d), jnp.float32).astype(jnp.bfloat16)
  mask = ops.attention.MaskSpec(q_offset=q_offset, kv_len=kv_len,
                                prefix_len=jnp.array([40, 0, 0][:b]), causal=True)
  return q_raw, k_raw, cache, mask


def test_reference_is_the_models_xla_path():
  """fold_keys then _decode_logits: the same logits, statistics and gate keys."""
  g = _gate(hq=8)
  q_raw, k_raw, cache, mask = _model_cache(g, 1)
  want_cache = g.fold_keys(cache, k_raw, mask)
  want = g._decode_logits(q_raw, want_cache, mask)[:, :, :, 0]   # pylint: disable=protected-access
  b, _, hq, d = q_raw.shape
  logits, stats, gate_key = gs.decode_logits_reference(
      q_raw.reshape(b, 2, hq // 2, d), k_raw[:, 0], tuple(cache[n] for n in sg.KEY_STATS),
      cache[gate.GATE_KEY], jnp.swapaxes(g.q_proj[...].reshape(2, hq // 2, d, -1), 2, 3),
      jnp.swapaxes(g.k_proj[...], 1, 2),
      mask.q_offset, mask.kv_len, layers.rope_frequencies(16, ROPE_BASE), block_k=BLOCK_K)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  for name, x in zip(sg.KEY_STATS, stats):
    np.testing.assert_array_equal(x, want_cache[name], err_msg=name)
  np.testing.assert_allclose(gate_key, want_cache[gate.GATE_KEY], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hq', [8, 6])   # groups of 4 and 3 (logits of 4 heads)
def test_the_gates_step_takes_both_kernels_where_its_decode_kernel_is_triton(hq):
  """BlockGate.step_tables: 'triton' on a CPU host runs gate_step and
  gate_select (interpreted), 'reference' fold_keys and the XLA selection; the
  same blocks and the same cache entries."""
  g = _gate(hq=hq)
  q_raw, k_raw, cache, mask = _model_cache(g, 2)
  g.decode_kernel = 'reference'
  want_ids, want_count, want_cache = g.step_tables(q_raw, k_raw, cache, mask)
  g.decode_kernel = 'triton'
  assert g._step_fused(1)   # pylint: disable=protected-access
  ids, count, got_cache = g.step_tables(q_raw, k_raw, cache, mask)
  np.testing.assert_array_equal(count, want_count)
  assert kept_sets(ids, count) == kept_sets(want_ids, want_count)
  assert (np.asarray(count) < 24).any(), 'the rule pruned nothing'
  assert set(got_cache) == set(want_cache)
  for name in got_cache:
    np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_the_step_runs_each_devices_rows_under_a_mesh():
  """Batch over data=2, heads over tensor=2: the logits and cache entries of one device."""
  g = _gate(hq=8, hkv=4)
  q_raw, k_raw, cache, mask = _model_cache(g, 3, b=2)
  g.decode_kernel = 'triton'
  want = g.step_tables(q_raw, k_raw, cache, mask)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=2)),
                            jax.devices()[:4])
  with sharding.activate(mesh, common.LOGICAL_AXIS_RULES):
    got = jax.jit(g.step_tables)(q_raw, k_raw, cache, mask)
  _assert_close(got, want)


def test_bad_shapes_name_the_problem():
  q, k, stats, gate_key, q_proj_t, k_proj_t, *rows = _case(1)
  call = lambda *args, **kw: gs.decode_logits(*args, *rows, block_k=BLOCK_K, interpret=True,
                                              **kw)
  with pytest.raises(ValueError, match=r'k_proj_t has shape \(2, 16, 32\), want \(2, 16, 96\)'):
    call(q, k, stats, gate_key, q_proj_t, k_proj_t[..., :32])
  with pytest.raises(ValueError, match='head_dim 24 must be a power of two'):
    call(q[..., :24], k[..., :24], tuple(x[..., :24] for x in stats), gate_key,
         q_proj_t[..., :24], k_proj_t[..., :72])
  with pytest.raises(ValueError, match='chunk=16 must be a power of two dividing n_k=24'):
    call(q, k, stats, gate_key, q_proj_t, k_proj_t, chunk=16)


@pytest.mark.parametrize('rows, n_k, chunk', [
    (32, 512, 128),   # chunks of 64 would make 256 programs
    (4, 512, 64), (32, 256, 64), (32, 128, 64),
    (4, 24, 8),       # the largest power of two dividing n_k
])
def test_launch_picks_chunks_of_64_unless_too_many_programs(rows, n_k, chunk):
  got, warps = gs.launch(rows, n_k)
  assert (got, warps) == (chunk, 8) and n_k % got == 0
