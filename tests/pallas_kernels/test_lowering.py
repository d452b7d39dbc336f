"""Every kernel lowers ahead of time for its accelerator, on this CPU host.

The interpreters run the kernels' logic, not their lowering: the Mosaic GPU
interpreter swaps the register-A PV wgmma for a plain dot, the Triton one never
asks for power-of-two blocks or a lowering rule per op, and Pallas' generic
interpreter runs the TPU kernels with none of Mosaic TPU's rules. Lowering for
an abstract device (jax.sharding.AbstractMesh(abstract_device=...)) runs the
Pallas-to-Mosaic-GPU, Pallas-to-Triton and Pallas-to-Mosaic-TPU lowerings that a
run on that device would (the Mosaic GPU one checks the shared-memory budget
too), so a kernel that no longer lowers fails here, not in the first device
call. What comes after them still needs the device: the PTX compile, and the
TPU compiler's own Mosaic passes (vector layouts).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib

from pallas_kernels.sparse_attention import BlockSizes, BlockTables
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import (decode, gate_select, gate_step, mosaic_gpu,
                                             mosaic_gpu_decode, select_triton, tpu, triton)

H100 = mesh_lib.AbstractDevice(device_kind='NVIDIA H100', num_cores=132, platform='gpu')
TPU_V5E = mesh_lib.AbstractDevice(device_kind='TPU v5 lite', num_cores=1, platform='tpu')
B, T, HQ, HKV, D = 2, 1024, 8, 2, 128
BF16, I32 = jnp.bfloat16, jnp.int32
SIZES = BlockSizes(128, 64)
N_Q, N_K = T // SIZES.block_q, T // SIZES.block_k


def _aval(shape, dtype=BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


def lower_for(device, fn, *avals):
  """The StableHLO text of jit(fn) lowered for an abstract device (H100, TPU_V5E)."""
  platform = {'gpu': 'cuda', 'tpu': 'tpu'}[device.platform]
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device)):
    return jax.jit(fn).trace(*avals).lower(lowering_platforms=(platform,)).as_text()


QKV = (_aval((B, T, HQ, D)), _aval((B, T, HKV, D)), _aval((B, T, HKV, D)))
TABLES = (_aval((B, HKV, N_Q, N_K), I32), _aval((B, HKV, N_Q), I32))
LENS = (_aval((B,), I32), _aval((B,), I32))
CACHE = (_aval((B, 1, HQ, D)), _aval((B, T, HKV, D)), _aval((B, T, HKV, D)))
DECODE_LENS = (_aval((B,), I32),) * 3


def _grad(attend):
  """d(sum of outputs)/d(q, k, v): the backward kernels behind the custom_vjp."""
  def loss(q, k, v, *rest):
    return attend(q, k, v, *rest).astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


def _with_full_tables(attend):
  """attend(q, k, v, tables, ...) taking the tables' arrays: kv tables plus
  the transposed ones the dk/dv kernels read, built inside."""
  def fn(q, k, v, kv_ids, kv_count, *lens):
    tables = bt.build_block_tables(bt.block_mask_from_tables(kv_ids, kv_count, N_K))
    return attend(q, k, v, tables, *lens)
  return fn


def _kv_only(attend):
  def fn(q, k, v, kv_ids, kv_count, *lens):
    return attend(q, k, v, BlockTables(kv_ids, kv_count, None, None), *lens)
  return fn


_MOSAIC = functools.partial(mosaic_gpu.sparse_attention, block_sizes=SIZES)
_MOSAIC_128 = functools.partial(mosaic_gpu.sparse_attention, block_sizes=BlockSizes(128, 128))
_TRITON = functools.partial(triton.sparse_attention, block_sizes=SIZES)
CASES = {
    'mosaic_forward': (_kv_only(lambda *a: mosaic_gpu.sparse_attention_fwd(
        *a, block_sizes=SIZES)[0]), QKV + TABLES + LENS, 'mosaic'),
    'mosaic_forward_persistent': (_kv_only(lambda *a: mosaic_gpu.sparse_attention_fwd(
        *a, block_sizes=SIZES, config=mosaic_gpu.Config(persistent_ctas=5))[0]),
        QKV + TABLES + LENS, 'mosaic'),
    'mosaic_backward': (_grad(_with_full_tables(_MOSAIC)), QKV + TABLES + LENS, 'mosaic'),
    # kv tables only: the transposed ones from select_triton.q_tables, a Triton kernel.
    'mosaic_backward_kv_tables': (_grad(_kv_only(_MOSAIC)), QKV + TABLES + LENS,
                                  ('mosaic', 'triton')),
    # block_k 128: no room for O in dq's shared memory, XLA computes delta.
    'mosaic_backward_bk128': (_grad(lambda q, k, v, ids, count, *lens: _MOSAIC_128(
        q, k, v, bt.build_block_tables(bt.block_mask_from_tables(ids, count, T // 128)),
        *lens)), QKV + (_aval((B, HKV, N_Q, T // 128), I32), TABLES[1]) + LENS, 'mosaic'),
    'mosaic_decode': (lambda q, k, v, ids, count, *lens: mosaic_gpu_decode.sparse_decode(
        q, k, v, ids, count, *lens, block_k=64),
        CACHE + (_aval((B, HKV, N_K), I32), _aval((B, HKV), I32)) + DECODE_LENS,
        ('mosaic', 'triton')),   # the Mosaic kernel, then the Triton merge
    'triton_forward_backward': (_grad(_with_full_tables(_TRITON)), QKV + TABLES + LENS,
                                'triton'),
    'triton_decode': (lambda q, k, v, ids, count, *lens: decode.sparse_decode(
        q, k, v, ids, count, *lens, block_k=64),
        CACHE + (_aval((B, HKV, N_K), I32), _aval((B, HKV), I32)) + DECODE_LENS, 'triton'),
    'triton_decode_scored': (lambda q, k, v, scores, cutoff, *lens: decode.sparse_decode_scored(
        q, k, v, scores, cutoff, *lens, block_k=64, rule='top_k'),
        CACHE + (_aval((B, HKV, N_K), jnp.float32), _aval((B, HKV), I32)) + DECODE_LENS,
        'triton'),
    # A ragged width (33 blocks, 11 kept): the kernel pads both to powers of two.
    'select_tables': (functools.partial(select_triton.tables_from_scores, max_k=11),
                      (_aval((2, 3, 33)), _aval((2, 3), I32)), 'triton'),
    'select_pool_keys': (functools.partial(select_triton.pool_keys, block_k=64), QKV[1:2],
                         'triton'),
    'select_score_tables': (functools.partial(select_triton.score_tables, max_k=7, block_q=128),
                            (QKV[0], _aval((B, 12, HKV, D)),
                             _aval((N_Q, 12), jnp.int8), _aval((N_Q,), I32)), 'triton'),
    'select_decode_ranked': (functools.partial(select_triton.decode_ranked_tables, max_k=7),
                             (CACHE[0], _aval((B, 12, HKV, D)), _aval((12,), jnp.int8),
                              _aval((B, HKV), I32)), 'triton'),
    'select_q_tables': (functools.partial(select_triton.q_tables, n_k=N_K), TABLES, 'triton'),
    # The learned gate's decode selection: 12 blocks (padded to 16), coverage on.
    'gate_decode_tables': (functools.partial(
        gate_select.decode_tables, causal=True, block_k=64, num_new=1, top_k=4,
        use_coverage=True, max_k=7),
        (_aval((B, HKV, HQ // HKV, 12), jnp.float32),) + DECODE_LENS
        + (_aval((), jnp.float32),) * 2, 'triton'),
    # The learned gate's decode step up to its logits: 16 blocks, gate_dim 64.
    'gate_decode_logits': (functools.partial(gate_step.decode_logits, block_k=64), (
        _aval((B, HKV, HQ // HKV, D)), _aval((B, HKV, D)),
        (_aval((B, 16, HKV, D), jnp.float32),) * 3, _aval((B, HKV, 16, 64), jnp.float32),
        _aval((HKV, HQ // HKV, 64, D)), _aval((HKV, 64, 3 * D)), _aval((B,), I32),
        _aval((B,), I32), _aval((32,), jnp.float32)), 'triton'),
    # A group of 3 (the `small` model's GQA), read one head at a time.
    'gate_decode_logits_group3': (functools.partial(gate_step.decode_logits, block_k=64), (
        _aval((B, HKV, 3, D)), _aval((B, HKV, D)),
        (_aval((B, 16, HKV, D), jnp.float32),) * 3, _aval((B, HKV, 16, 64), jnp.float32),
        _aval((HKV, 3, 64, D)), _aval((HKV, 64, 3 * D)), _aval((B,), I32),
        _aval((B,), I32), _aval((32,), jnp.float32)), 'triton'),
}


@pytest.mark.parametrize('name', CASES)
def test_lowers_for_an_h100(name):
  fn, avals, backend = CASES[name]
  text = lower_for(H100, fn, *avals)
  for kind in (backend,) if isinstance(backend, str) else backend:
    assert {'mosaic': 'mosaic_gpu', 'triton': '__gpu$xla.gpu.triton'}[kind] in text


def test_tpu_kernels_lower_for_a_v5e():
  """The Mosaic-TPU forward, dq and dk/dv kernels (three custom calls) at
  TPU-sized blocks: docs/tpu_sparse_attention.md lists what this leaves untested."""
  attend = functools.partial(tpu.sparse_attention, block_sizes=SIZES)
  text = lower_for(TPU_V5E, _grad(_with_full_tables(attend)), *QKV, *TABLES, *LENS)
  assert text.count('tpu_custom_call') == 3
