"""The Mosaic GPU block-sparse forward (with the Mosaic backward behind its
custom_vjp) through the shared suite, in the GPU interpreter on the CPU.

The interpreter simulates the three warpgroups, TMA copies and barriers, so
the pipeline's synchronisation is checked too (it fails on a barrier phase
nobody waited for). It runs the same kernel as the GPU except for the PV
product: jax 0.11.2's interpreter lacks run_state and register-A wgmma, so
there the product is a plain dot (mosaic_gpu._attend says where).
"""

import contextlib
import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import budgets
from pallas_kernels.sparse_attention import BlockSizes, BlockTables, mosaic_gpu
from pallas_kernels.sparse_attention import block_tables as bt
from tests.pallas_kernels.sparse_attention_base import (
    CASES, SparseAttentionTestBase, make_inputs)


class TestMosaicInterpret(SparseAttentionTestBase):
  kernel = staticmethod(functools.partial(mosaic_gpu.sparse_attention, interpret=True))
  block_sizes = (BlockSizes(128, 64), BlockSizes(128, 128))
  dtypes = ('bfloat16',)
  head_dims = (64,)
  seq_blocks = 1            # one 128-row query tile: the interpreter is slow

  def grad_case(self, case_id):
    return case_id in ('random_ragged_gqa4-bfloat16', 'empty_rows-bfloat16')


def _forward(x, config=mosaic_gpu.Config(), detect_races=False):
  # Wait for the run: the interpreter dispatches JAX ops from its callback
  # threads, and eager ops issued on this thread meanwhile can deadlock with them.
  return jax.block_until_ready(mosaic_gpu.sparse_attention_fwd(
      x.q, x.k, x.v, x.tables, x.kv_len, x.prefix_len, block_sizes=x.block_sizes,
      config=config, interpret=plgpu.InterpretGPUParams(detect_races=detect_races)))


_PERSISTENT_CASES = {c.name: c for c in CASES}


@pytest.mark.parametrize('name, block_k, ctas', [
    ('random_ragged_gqa4', 64, 3), ('empty_rows', 128, 5), ('kv_longer_than_q', 64, 1),
    ('diagonal_only', 128, 64)])
def test_persistent_ctas_give_the_same_bits(name, block_k, ctas):
  """Config.persistent_ctas: each CTA loops over its tiles (the K/V ring and
  the q buffers running on from tile to tile), and every tile is computed as
  with a CTA of its own, so out and lse are bit-identical. ctas 1: one CTA
  takes every tile; 64: more CTAs than tiles (one each)."""
  x = make_inputs(_PERSISTENT_CASES[name], jnp.bfloat16, 64, BlockSizes(128, block_k), 2)
  want = _forward(x)
  got = _forward(x, mosaic_gpu.Config(persistent_ctas=ctas))
  for n, g, w in zip(('out', 'lse'), got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), n)


@pytest.mark.parametrize('ctas', [0, 3])
def test_lengths_left_out_are_full_and_causal(ctas):
  """kv_len / prefix_len None (static: every key valid, no prefix; the kernel
  then takes no length arrays) give the bits of full lengths and zero
  prefixes. The backward's kernels: test_sparse_mosaic_backward.py's
  test_left_out_lengths_are_full_lengths_and_no_prefix."""
  x = make_inputs(_PERSISTENT_CASES['random_ragged_gqa4'], jnp.bfloat16, 64,
                  BlockSizes(128, 64), 2)
  b, s = x.k.shape[:2]
  full = dataclasses.replace(x, kv_len=jnp.full((b,), s, jnp.int32),
                             prefix_len=jnp.zeros((b,), jnp.int32))
  config = mosaic_gpu.Config(persistent_ctas=ctas)
  want = _forward(full, config)
  got = _forward(dataclasses.replace(full, kv_len=None, prefix_len=None), config)
  for n, g, w in zip(('out', 'lse'), got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), n)


@pytest.mark.parametrize('ctas', [0, 4])
def test_no_races(ctas):
  """The interpreter's race detector over the forward, one tile a CTA and
  persistent (ring refills within and across tiles; q buffers reused)."""
  case = _PERSISTENT_CASES['random_ragged_gqa4']
  x = make_inputs(case, jnp.bfloat16, 64, BlockSizes(128, 64), 3)
  log = io.StringIO()
  with contextlib.redirect_stdout(log):   # the detector prints each race it finds
    _forward(x, mosaic_gpu.Config(persistent_ctas=ctas), detect_races=True)
  assert 'RACE' not in log.getvalue(), log.getvalue()[:2000]


@pytest.mark.parametrize('batch, hq, n_q, ctas', [(2, 4, 3, 5), (1, 16, 32, 132), (3, 2, 2, 1),
                                                  (2, 8, 8, 16), (1, 2, 1, 7)])
def test_persistent_ctas_take_every_tile_once(batch, hq, n_q, ctas):
  """_work's snake over the tiles: each tile once, longest (last query tile,
  whatever the batch) first in every CTA's list, and no CTA over one tile
  above the average."""
  ctas = min(ctas, batch * hq * n_q)
  st = mosaic_gpu._Static(block_k=64, num_stages=2, scale=1.0, dtype=jnp.bfloat16,
                          interpreted=True, batch=batch, hq=hq, group=2 if hq > 1 else 1,
                          n_q=n_q, width=1, ctas=ctas)
  seen = []
  for c in range(ctas):
    count = int(mosaic_gpu._tile_count(c, st))
    tiles = [tuple(int(v) for v in mosaic_gpu._work(c, i, st)) for i in range(count)]
    assert count <= -(-st.tiles // ctas)
    qts = [qt for _, _, qt, _ in tiles]
    assert qts == sorted(qts, reverse=True)
    for b, h, qt, row in tiles:   # the table row of (batch, kv head, query tile)
      assert row == (b * (hq // st.group) + h // st.group) * n_q + qt
    seen += [t[:3] for t in tiles]
  want = [(b, h, qt) for b in range(batch) for h in range(hq) for qt in range(n_q)]
  assert sorted(seen) == want


@pytest.mark.parametrize('batch, n_q', [(4, 32), (2, 64), (8, 16)])
@pytest.mark.parametrize('keep', [1.0, 0.35])
def test_persistent_snake_balances_causal_tiles(batch, n_q, keep):
  """The H200's 132 CTAs over the benchmark's causal tiles (16 heads, its
  budgets): the busiest CTA's blocks stay within 3% of the mean plus one tile.
  Batch-slowest order overloaded some by 26-29% at 4k."""
  hq, ctas = 16, 132
  st = mosaic_gpu._Static(block_k=128, num_stages=2, scale=1.0, dtype=jnp.bfloat16,
                          interpreted=True, batch=batch, hq=hq, group=4, n_q=n_q, width=1,
                          ctas=ctas)
  blocks = budgets.causal_row_budgets(keep, n_q * 128, 128, 128)
  loads = [sum(blocks[int(mosaic_gpu._work(c, i, st)[2])]
               for i in range(int(mosaic_gpu._tile_count(c, st)))) for c in range(ctas)]
  mean = blocks.sum() * batch * hq / ctas
  assert max(loads) <= 1.03 * mean + blocks[-1], (max(loads), mean)


def test_persistent_ctas_must_not_be_negative():
  with pytest.raises(ValueError, match='persistent_ctas=-1'):
    mosaic_gpu.Config(persistent_ctas=-1)


def test_tables_from_scores_without_q_tables_still_differentiate():
  """kv tables alone (the gate's inference path) get q tables in the backward."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (1, 256, 2, 64), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, 256, 1, 64), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, 256, 1, 64), jnp.bfloat16)
  scores = jax.random.normal(keys[3], (1, 1, 2, 4))
  ids, count = bt.tables_from_scores(scores, jnp.full((1, 1, 2), 2, jnp.int32), 2)
  sizes = BlockSizes(128, 64)
  full = bt.build_block_tables(bt.block_mask_from_tables(ids, count, 4))
  lens = jnp.array([256]), jnp.array([0])
  def loss(tables):
    f = lambda q, k, v: mosaic_gpu.sparse_attention(
        q, k, v, tables, *lens, block_sizes=sizes, interpret=True).astype(jnp.float32).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(loss(BlockTables(ids, count, None, None)), loss(full)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize('what, kwargs, match', [
    ('f32', dict(dtype=jnp.float32), 'bf16/f16'),
    ('block_q', dict(sizes=BlockSizes(64, 64)), 'block_q=128'),
    ('head_dim', dict(d=32), 'head_dim=32'),
])
def test_bad_input_names_the_problem(what, kwargs, match):
  d, dtype = kwargs.get('d', 64), kwargs.get('dtype', jnp.bfloat16)
  q = jnp.zeros((1, 128, 2, d), dtype)
  k = jnp.zeros((1, 128, 1, d), dtype)
  tables = bt.build_block_tables(jnp.ones((1, 1, 1, 2), bool))
  with pytest.raises(ValueError, match=match):
    mosaic_gpu.sparse_attention(q, k, k, tables, jnp.array([128]), jnp.array([0]),
                                block_sizes=kwargs.get('sizes', BlockSizes(128, 64)),
                                interpret=True)


@pytest.mark.parametrize('name', ['mosaic', 'mosaic_persistent'])
def test_seam_names_the_gpu_it_needs(name):
  """model.sparse.kernel 'mosaic' / 'mosaic_persistent' on a host without a
  Hopper GPU: a clear error, not a fallback that hides the choice."""
  from flashmm_jax.ops import sparse_attention as sparse_ops
  with pytest.raises(NotImplementedError, match='need a Hopper GPU'):
    sparse_ops.get(name)(None, None, None, None, None, None)


def test_auto_runs_the_persistent_forward_on_hopper(monkeypatch):
  """'auto' on a Hopper GPU, where the shapes fit: the Mosaic kernels with the
  persistent forward (the faster at 65% sparsity, docs/results.md)."""
  from flashmm_jax.ops import sparse_attention as sparse_ops
  calls = []
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(sparse_ops, '_is_hopper', lambda: True)
  monkeypatch.setattr(sparse_ops, '_mosaic', lambda *a, **kw: calls.append(kw))
  q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
  sparse_ops.get('auto')(q, k, k, None, None, BlockSizes(128, 64))
  assert calls == [dict(persistent=True)]
