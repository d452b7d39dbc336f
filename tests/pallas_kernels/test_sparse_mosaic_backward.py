"""The Mosaic GPU block-sparse backward (mosaic_gpu_backward.py) in the GPU
interpreter on the CPU, against jax.vjp of the f32 jnp reference.

The interpreter simulates the warpgroups, TMA copies, barriers and wgmma, so
the pipelines' synchronisation is checked too (a barrier phase nobody waited
for fails; test_no_races runs its race detector). Only the products with the
A operand in registers are plain dots here (mosaic_gpu_backward._mma says
why). The forward's out and lse come from jnp, so these tests do not depend
on a forward kernel, except test_with_the_mosaic_forward.
"""

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sparse_attention import BlockSizes, mosaic_gpu, mosaic_gpu_backward
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention.reference import element_mask, expand_block_mask
from tests.pallas_kernels.sparse_attention_base import (
    Case, assert_close, make_inputs, reference, rows_without_keys)

TOL = (6e-2, 3e-2)   # bf16 gradients, as the shared suite's grad_tolerances


@dataclasses.dataclass(frozen=True)
class BwdCase:
  case: Case
  block_k: int
  seq_blocks: int = 1        # 128-row query tiles
  drop_q_tables: bool = False


CASES = {
    # kv tables only: the backward builds the transposed q tables itself.
    'random_ragged_gqa4_bk64': BwdCase(
        Case('r', 'random', (4, 1), (0.86, 0.58), (0.5, 0.1), seed=1), 64,
        drop_q_tables=True),
    'random_ragged_mha_bk128': BwdCase(
        Case('r', 'random', (2, 2), (0.9, 0.6), (0.3, 0.0), kv_blocks_ratio=2, seed=7), 128),
    'empty_rows_gqa2_bk64': BwdCase(
        Case('e', 'empty_rows', (4, 2), (1.0, 0.7), (0.6, 0.0), seed=5), 64),
    'kv_len_zero_row_gqa2_bk64': BwdCase(
        Case('z', 'random', (2, 1), (0.0, 0.55), (0.0, 1.0), seed=6), 64),
    # Two query tiles: both lists hold fully visible and masked tiles.
    'causal_all_blocks_gqa4_bk64': BwdCase(
        Case('c', 'all', (4, 1), (1.0, 1.0), (0.0, 0.3), seed=2), 64, seq_blocks=2),
    # Batch 0 is bidirectional: every tile takes the unmasked path.
    'prefix_all_blocks_mha_bk128': BwdCase(
        Case('p', 'all', (2, 2), (1.0, 0.75), (1.0, 0.6), kv_blocks_ratio=2, seed=3), 128),
}


def _inputs(c: BwdCase):
  return make_inputs(c.case, jnp.bfloat16, 64, BlockSizes(128, c.block_k), c.seq_blocks)


def _visible(x):
  """bool [B, Hq, T, S]: the reference's (query, key) pairs."""
  t, s = x.q.shape[1], x.k.shape[1]
  return (expand_block_mask(x.block_mask, x.q.shape[2], x.block_sizes)
          & element_mask(t, s, x.kv_len, x.prefix_len)[:, None])


def _lse(x):
  """The forward's row logsumexp (natural log), -inf on rows with no key."""
  q, k = x.q.astype(jnp.float32), x.k.astype(jnp.float32)
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k) * q.shape[-1] ** -0.5
  return jax.nn.logsumexp(jnp.where(_visible(x), logits, -jnp.inf), axis=-1)


def _grads(x, tables=None, out=None, lse=None, interpret=True,
           config=mosaic_gpu_backward.Config()):
  """(ours, reference's) (dq, dk, dv) for a random output cotangent."""
  f32 = lambda a: a.astype(jnp.float32)
  _, vjp = jax.vjp(lambda q, k, v: reference(x, q, k, v), f32(x.q), f32(x.k), f32(x.v))
  ref_out, ref_lse, d_out = _grads_inputs(x)
  out = ref_out if out is None else out
  lse = ref_lse if lse is None else lse
  got = mosaic_gpu_backward.backward(
      x.q, x.k, x.v, x.tables if tables is None else tables, x.kv_len, x.prefix_len,
      out, lse, d_out, block_sizes=x.block_sizes, config=config, interpret=interpret)
  return got, vjp(f32(d_out))


@pytest.mark.parametrize('name', CASES)
def test_grads_match_reference(name):
  c = CASES[name]
  x = _inputs(c)
  tables = x.tables._replace(q_ids=None, q_count=None) if c.drop_q_tables else None
  got, want = _grads(x, tables)
  for n, g, r, a in zip('qkv', got, want, (x.q, x.k, x.v)):
    assert g.shape == a.shape and g.dtype == a.dtype, n
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f'd{n} not finite'
    assert_close(g, r, TOL, f'd{n}')
  # Nothing visible, nothing back: exact zeros.
  dq, dk, dv = (np.asarray(g, np.float32) for g in got)
  assert not np.any(dq[rows_without_keys(x)]), 'dq of keyless rows'
  hkv = x.k.shape[2]
  seen = np.asarray(_visible(x)).any(2)                      # [B, Hq, S]
  seen = seen.reshape(seen.shape[0], hkv, -1, seen.shape[-1]).any(2)
  unseen = ~np.swapaxes(seen, 1, 2)                          # [B, S, Hkv]
  assert not np.any(dk[unseen]) and not np.any(dv[unseen]), 'dk/dv of unseen keys'


def test_left_out_lengths_are_full_lengths_and_no_prefix():
  """kv_len / prefix_len None (static, no array passed to the kernels) give
  the gradients of all-full kv_len and all-zero prefix_len, bit for bit."""
  case = Case('c', 'all', (4, 2), (1.0, 1.0), (0.0, 0.0), seed=4)
  x = make_inputs(case, jnp.bfloat16, 64, BlockSizes(128, 64), 2, batch=2)
  full, want = _grads(x)
  static = jax.block_until_ready(mosaic_gpu_backward.backward(
      x.q, x.k, x.v, x.tables, None, None, *_grads_inputs(x), block_sizes=x.block_sizes,
      interpret=True))
  for n, a, b, r in zip('qkv', full, static, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), n)
    assert_close(b, r, TOL, f'd{n}')


def _grads_inputs(x):
  """(out, lse, d_out) as _grads builds them."""
  out = reference(x).astype(x.q.dtype)
  d_out = jax.random.normal(jax.random.PRNGKey(3), x.q.shape).astype(x.q.dtype)
  return out, _lse(x), d_out


@pytest.mark.parametrize('block_k, stages, room', [(64, 2, True), (64, 3, True),
                                                   (64, 4, False), (128, 2, False)])
def test_dq_computes_delta_where_o_fits(block_k, stages, room):
  """At head dim 128 the dq kernel takes O's rows into shared memory (and
  computes lse2 and delta) only beside a ring this small; test_lowering.py
  lowers both kinds within the GPU's shared memory."""
  st = mosaic_gpu_backward._Static(block_k=block_k, group=4, width=8, stages=stages,
                                   scale=1.0, sm_scale=1.0, dtype=jnp.bfloat16,
                                   interpret=None)
  assert mosaic_gpu_backward._dq_has_room_for_o(st, 128) == room


def test_configs_refuse_rings_of_one_slot():
  with pytest.raises(ValueError, match='dq_stages=1, dkv_stages=2'):
    mosaic_gpu_backward.Config(dq_stages=1)
  with pytest.raises(ValueError, match='num_stages=1 must be >= 2'):
    mosaic_gpu.Config(num_stages=1)
  # The forward's config carries the backward's into the custom_vjp.
  assert mosaic_gpu.Config(3, mosaic_gpu_backward.Config(4)).backward.dq_stages == 4
  from benchmarks import attention as bench   # its --bwd_configs specs
  assert bench.bwd_config('5x2') == mosaic_gpu_backward.Config(5, 2)
  assert bench.bwd_config('3x2xheads_slowest') == mosaic_gpu_backward.Config(
      3, 2, dkv_order='heads_slowest')
  with pytest.raises(ValueError, match="dkv_order='sideways'"):
    bench.bwd_config('2x2xsideways')
  for spec in ('5', '2x2xsink_firstxheads_slowest'):
    with pytest.raises(ValueError, match=f"'{spec}' is not DQxDKV"):
      bench.bwd_config(spec)


@pytest.mark.parametrize('block_k', [64, 128])
def test_no_races(block_k):
  """The interpreter's race detector over both kernels, with ring refills
  (more steps than slots) and, at block_k 64, the hand-over of partials."""
  case = Case('c', 'all', (4, 2), (1.0, 0.7), (0.3, 0.1), kv_blocks_ratio=2, seed=1)
  x = make_inputs(case, jnp.bfloat16, 64, BlockSizes(128, block_k), 2, batch=1)
  b, t, hq, _ = x.q.shape
  log = io.StringIO()
  with contextlib.redirect_stdout(log):   # the detector prints each race it finds
    jax.block_until_ready(mosaic_gpu_backward.backward(
        x.q, x.k, x.v, x.tables, x.kv_len, x.prefix_len, x.q, jnp.zeros((b, hq, t)), x.q,
        block_sizes=x.block_sizes, interpret=plgpu.InterpretGPUParams(detect_races=True)))
  assert 'RACE' not in log.getvalue(), log.getvalue()[:2000]


def test_with_the_mosaic_forward():
  """out and lse from the Mosaic forward kernel (interpreted) feed this backward."""
  c = CASES['random_ragged_gqa4_bk64']
  x = _inputs(c)
  out, lse = mosaic_gpu.sparse_attention_fwd(
      x.q, x.k, x.v, x.tables, x.kv_len, x.prefix_len, block_sizes=x.block_sizes,
      interpret=plgpu.InterpretGPUParams())
  got, want = _grads(x, out=out, lse=lse)
  for n, g, r in zip('qkv', got, want):
    assert_close(g, r, TOL, f'd{n}')


@pytest.mark.parametrize('rows', [128, 64])   # a tile, a warpgroup's half
def test_whole_below_bounds_the_mask_free_tiles(rows):
  """The tiles whose keys end at or below whole_below of their first row
  are exactly those the element mask leaves all True."""
  t, bk = 1024, 64
  kv_len, prefix = jnp.array([1024, 700, 300, 0]), jnp.array([0, 200, 300, 0])
  mask = np.asarray(element_mask(t, t, kv_len, prefix))       # [B, T, S]
  n_q, n_k = t // rows, t // bk
  want = mask.reshape(4, n_q, rows, n_k, bk).all(axis=(2, 4))
  q_tile = jnp.arange(n_q)[None, :, None]
  key_end = (jnp.arange(n_k)[None, None, :] + 1) * bk
  got = key_end <= bt.whole_below(q_tile * rows, kv_len[:, None, None], prefix[:, None, None])
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize('what, kwargs, match', [
    ('f32', dict(dtype=jnp.float32), 'bf16/f16'),
    ('block_q', dict(sizes=BlockSizes(64, 64)), 'block_q=128'),
    ('head_dim', dict(d=256), 'head_dim=256'),
    ('d_out', dict(d_out_rows=256), 'd_out.shape'),
])
def test_bad_input_names_the_problem(what, kwargs, match):
  d, dtype = kwargs.get('d', 64), kwargs.get('dtype', jnp.bfloat16)
  q = jnp.zeros((1, 128, 2, d), dtype)
  k = jnp.zeros((1, 128, 1, d), dtype)
  d_out = jnp.zeros((1, kwargs.get('d_out_rows', 128), 2, d), dtype)
  tables = bt.build_block_tables(jnp.ones((1, 1, 1, 2), bool))
  with pytest.raises(ValueError, match=match):
    mosaic_gpu_backward.backward(
        q, k, k, tables, jnp.array([128]), jnp.array([0]), q, jnp.zeros((1, 2, 128)),
        d_out, block_sizes=kwargs.get('sizes', BlockSizes(128, 64)), interpret=True)


def _assert_same_grads(x, base_config, *configs):
  """Bit-identical (dq, dk, dv) under base_config and each of configs."""
  # Wait for each run: the interpreter dispatches JAX ops from its callback
  # threads, and eager ops issued on this thread meanwhile can deadlock with them.
  base = jax.block_until_ready(_grads(x, config=base_config)[0])
  for config in configs:
    got = jax.block_until_ready(_grads(x, config=config)[0])
    for n, a, b in zip('qkv', base, got):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                    f'd{n} under {config}')


def test_deeper_dq_ring_computes_the_same_grads():
  """More dq ring slots (the knob benchmarks/attention.py --bwd_configs sweeps) only
  change when blocks arrive, not the order they are summed in: identical grads,
  also where a tile lists fewer blocks than there are slots (2 and 4 blocks, 3
  slots; at 3 the kernel still computes delta itself, at 4 or more XLA does)."""
  _assert_same_grads(_inputs(CASES['causal_all_blocks_gqa4_bk64']),
                     mosaic_gpu_backward.Config(), mosaic_gpu_backward.Config(dq_stages=3))


@pytest.mark.parametrize('b,hkv,n_k', [(1, 4, 256), (2, 2, 3), (3, 3, 1), (2, 1, 5)])
@pytest.mark.parametrize('order', mosaic_gpu_backward.DKV_ORDERS)
def test_dkv_launch_orders_visit_every_tile_once(order, b, hkv, n_k):
  q_count = jax.random.randint(jax.random.PRNGKey(n_k), (b, hkv, n_k), 0, 9)
  launch = np.asarray(mosaic_gpu_backward._dkv_launch_order(q_count, order))
  assert sorted(launch.tolist()) == list(range(b * hkv * n_k))
  kb, counts = launch % n_k, np.asarray(q_count).reshape(-1)[launch]
  if order == 'sink_first':   # the first key block of every head and row first
    assert (kb[:b * hkv] == 0).all()
  if order == 'longest_first':
    assert (np.diff(counts) <= 0).all()
  if order == 'blocks_ascending':   # key block by key block, heads and rows within
    assert (np.diff(kb) >= 0).all()


@pytest.mark.parametrize('n', [1, 5, 1024, mosaic_gpu_backward.RANK_MAX_TILES + 3])
def test_longest_first_is_a_stable_descending_argsort(n):
  """Ties (many at 9 values) keep their index order, with or without the sort."""
  counts = jax.random.randint(jax.random.PRNGKey(n), (n,), 0, 9)
  np.testing.assert_array_equal(mosaic_gpu_backward._longest_first(counts),
                                np.argsort(-np.asarray(counts), kind='stable'))


def test_dkv_launch_order_changes_no_gradient():
  """Each dk/dv CTA sums its own key block's gradients: the order it launches
  in (Config.dkv_order) cannot change them. Two kv heads, two key blocks."""
  _assert_same_grads(_inputs(CASES['random_ragged_mha_bk128']),
                     mosaic_gpu_backward.Config(dkv_order='heads_slowest'),
                     *(mosaic_gpu_backward.Config(dkv_order=order)
                       for order in ('sink_first', 'longest_first', 'blocks_ascending')))
  with pytest.raises(ValueError, match="dkv_order='diagonal'"):
    mosaic_gpu_backward.Config(dkv_order='diagonal')
