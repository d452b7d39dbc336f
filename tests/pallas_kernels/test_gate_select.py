"""gate_select: the learned gate's decode selection from its logits in one
kernel (Triton interpreter) against its plain-jnp reference, that reference
against the model's own XLA path (BlockGate.select_decode + compact_rows),
and the gate through the seam it calls. Random logits: the probabilities have
no near-ties at these sizes, so the kept sets must agree exactly; the GPU
lowering is in test_lowering.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from flashmm_jax import ops
from flashmm_jax.models import gate
from flashmm_jax.training import sharding
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import gate_select as gs

BLOCK_K, ROPE_BASE = 16, 10000.0
RULES = {'threshold': dict(threshold=0.3, top_k=0, coverage=0.0),
         'top_k': dict(threshold=0.0, top_k=5, coverage=0.0),
         'coverage': dict(threshold=0.0, top_k=0, coverage=0.6),
         'all_three': dict(threshold=0.05, top_k=7, coverage=0.8),
         'keep_all': dict(threshold=0.0, top_k=0, coverage=0.0)}


def _logits(seed, b=2, hkv=2, group=4, n_k=24):
  return jax.random.normal(jax.random.key(seed), (b, hkv, group, n_k), jnp.float32) * 2.0


def _rows(b, n_k, m):
  """q_offset, kv_len, prefix_len: row 0 near the end of the cache, row 1 half way
  (later blocks invisible), a bidirectional prefix of 40 keys in row 0."""
  q_offset = jnp.array([n_k * BLOCK_K - m - 3, n_k * BLOCK_K // 2 + 5][:b])
  return q_offset, q_offset + m, jnp.array([40, 0][:b])


def _kernel_and_reference(logits, rule, chunk, m=1, max_k=None, causal=True):
  n_k = logits.shape[-1]
  rows = _rows(logits.shape[0], n_k, m)
  max_k = max_k or n_k
  got = gs.decode_tables(logits, *rows, rule['threshold'], rule['coverage'], causal=causal,
                         block_k=BLOCK_K, num_new=m, top_k=rule['top_k'],
                         use_coverage=rule['coverage'] > 0, max_k=max_k, chunk=chunk,
                         interpret=True)
  want = gs.decode_tables_reference(logits, *rows, causal=causal, block_k=BLOCK_K, num_new=m,
                                    max_k=max_k, **rule)
  return got, want


@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('shape, m, chunk', [
    (dict(), 1, 8),                          # 24 blocks padded to 32, 4 programs a row
    (dict(hkv=4, group=1, n_k=16), 4, 16),   # 4 new tokens, group 1, one program a row
    (dict(group=8, n_k=40), 1, 16),          # group 8, 40 blocks padded to 64
    (dict(group=3), 2, 8),                   # group 3 padded to 4 (the tiny model's GQA)
])
def test_kernel_equals_its_reference(rule, shape, m, chunk):
  logits = _logits(7, **shape)
  (ids, count), (want_ids, want_count) = _kernel_and_reference(logits, RULES[rule], chunk, m)
  n_k = logits.shape[-1]
  np.testing.assert_array_equal(count, want_count)
  # Every block in rank order, the kept ones first.
  np.testing.assert_array_equal(ids[..., :n_k], want_ids)


def test_a_table_narrower_than_the_row_holds_its_first_ranks():
  """max_k 9 of 24 blocks (a top-k budget's width): 16 slots, the first 16
  ranks; the count stays within the budget's."""
  logits = _logits(3)
  rule = dict(threshold=0.0, top_k=6, coverage=0.0)
  (ids, count), (want_ids, want_count) = _kernel_and_reference(logits, rule, chunk=8, max_k=9)
  full, _ = gs.decode_tables_reference(logits, *_rows(2, 24, 1), causal=True, block_k=BLOCK_K,
                                       num_new=1, max_k=24, **rule)
  assert ids.shape[-1] == 16
  np.testing.assert_array_equal(ids, full[..., :16])
  np.testing.assert_array_equal(want_ids, full[..., :9])
  np.testing.assert_array_equal(count, want_count)
  assert (np.asarray(count) <= 9).all()


def test_bidirectional_rows_see_every_written_block():
  """causal=False: every block below kv_len is visible (kv_len 382: 24 blocks)."""
  logits = _logits(5, b=1)
  (ids, count), (want_ids, want_count) = _kernel_and_reference(
      logits, RULES['keep_all'], chunk=8, causal=False)
  np.testing.assert_array_equal(count, want_count)
  np.testing.assert_array_equal(ids[..., :24], want_ids)
  assert int(count[0, 0]) == -(-int(_rows(1, 24, 1)[1][0]) // BLOCK_K)


# --------------------------------------------- the model's gate and its seam ---

def _gate(rule, hq=8, hkv=2, d=32, g_dim=16):
  cfg = common.base_config('flash', 'tiny').model
  cfg.sparse.update(enabled=True, decode=True, block_k=BLOCK_K, gate_dim=g_dim, **rule)
  return gate.BlockGate(hq, hkv, d, cfg, ROPE_BASE, rngs=nnx.Rngs(0))


def _cache_and_mask(g, seed, b, n_k, m):
  q_offset, kv_len, prefix_len = _rows(b, n_k, m)
  hkv, g_dim = g.num_kv_heads, g.q_proj[...].shape[-1]
  gate_keys = jax.random.normal(jax.random.key(seed), (b, hkv, n_k, g_dim), jnp.float32) * 2.0
  cache = {'k': jnp.zeros((b, n_k * BLOCK_K, hkv, g.head_dim), jnp.bfloat16),
           gate.GATE_KEY: gate_keys}
  mask = ops.attention.MaskSpec(q_offset=q_offset, kv_len=kv_len, prefix_len=prefix_len,
                                causal=True)
  return cache, mask


def kept_sets(ids, count):
  """Per (row, kv head), the set of the first count ids (test_gate_step too)."""
  return [[set(np.asarray(ids)[b, h, :c].tolist()) for h, c in enumerate(row)]
          for b, row in enumerate(np.asarray(count))]


@pytest.mark.parametrize('rule', ['threshold', 'top_k', 'coverage', 'all_three'])
@pytest.mark.parametrize('m', [1, 2])
def test_reference_keeps_the_models_blocks(rule, m):
  """The reference (and so the kernel) keeps select_decode's blocks from the
  model's own gate logits: its projection, the cached gate keys, the MaskSpec."""
  g = _gate(RULES[rule])
  q = jax.random.normal(jax.random.key(m), (2, m, 8, 32), jnp.float32).astype(jnp.bfloat16)
  cache, mask = _cache_and_mask(g, 11, 2, 24, m)
  want_ids, want_count = bt.compact_rows(g.select_decode(q, cache, mask)[:, :, 0], 24)
  logits = g._decode_logits(q, cache, mask)[:, :, :, 0]   # pylint: disable=protected-access
  ids, count = gs.decode_tables_reference(
      logits, mask.q_offset, mask.kv_len, mask.prefix_len, causal=True, block_k=BLOCK_K,
      num_new=m, max_k=24, **RULES[rule])
  np.testing.assert_array_equal(count, want_count)
  assert kept_sets(ids, count) == kept_sets(want_ids, want_count)


@pytest.mark.parametrize('hq', [8, 6])   # groups of 4 and 3
def test_the_gate_takes_the_kernel_where_its_decode_kernel_is_triton(hq):
  """BlockGate.decode_tables through ops.sparse_attention.gate_decode_tables:
  'triton' on a CPU host runs the kernel (interpreted), 'reference' the XLA
  path; the same blocks, the kernel's in rank order."""
  g = _gate(RULES['all_three'], hq=hq)
  q = jax.random.normal(jax.random.key(2), (2, 1, hq, 32), jnp.float32).astype(jnp.bfloat16)
  cache, mask = _cache_and_mask(g, 4, 2, 24, 1)
  g.decode_kernel = 'reference'
  want = g.decode_tables(q, cache, mask)
  g.decode_kernel = 'triton'
  got = g.decode_tables(q, cache, mask)
  assert got[0].shape[-1] == 16 and want[0].shape[-1] == 9   # top_k 7 + block 0 + own block
  assert kept_sets(*got) == kept_sets(*want)


def test_the_seam_runs_each_devices_rows_under_a_mesh():
  """Batch over data=2, heads over tensor=2: the tables of one device."""
  g = _gate(RULES['coverage'], hq=8, hkv=4)
  q = jax.random.normal(jax.random.key(9), (2, 1, 8, 32), jnp.float32).astype(jnp.bfloat16)
  cache, mask = _cache_and_mask(g, 6, 2, 24, 1)
  g.decode_kernel = 'triton'
  want = g.decode_tables(q, cache, mask)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=2)),
                            jax.devices()[:4])
  with sharding.activate(mesh, common.LOGICAL_AXIS_RULES):
    got = jax.jit(g.decode_tables)(q, cache, mask)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])


def test_bad_shapes_name_the_problem():
  call = lambda logits, **kw: gs.decode_tables(
      logits, *_rows(2, 24, 1), 0.0, 0.0, causal=True, block_k=BLOCK_K, num_new=1, top_k=0,
      use_coverage=False, interpret=True, **{'max_k': 24, **kw})
  with pytest.raises(ValueError, match='max_k=30 must be in'):
    call(_logits(1), max_k=30)
  with pytest.raises(ValueError, match=r'group=5 must be in \[1, 4\]'):
    call(_logits(1), group=5)
