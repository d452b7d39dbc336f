"""The block-sparse attention seam: kernels that visit only listed tiles.

A layer with a gate calls `sparse_attend(q, k, v, mask, tables)`; which kernel
runs is the config's `model.sparse.kernel` ('reference' | 'triton' | 'mosaic' |
'mosaic_persistent' | 'tpu' | 'auto'), a separate knob from the dense
`model.attention`. The element mask (causal, prefix, padding) still comes from
`MaskSpec`; the tables only say which (query block, key block) tiles are
computed at all.

Every implementation has the signature
  fn(q, k, v, mask, tables, block_sizes) -> [B, T, Hq, D]
with q [B, T, Hq, D], k/v [B, S, Hkv, D], tables a `BlockTables` whose kv
head axis is Hkv, and T, S multiples of the block sizes. Under a mesh of
several devices each kernel runs on its device's rows and heads (ops.partition).
"""

import jax

from flashmm_jax.ops import partition
from flashmm_jax.ops import registry
from pallas_kernels.sparse_attention import block_tables as bt
from pallas_kernels.sparse_attention import decode
from pallas_kernels.sparse_attention import reference
from pallas_kernels.sparse_attention import triton_common

_REGISTRY = registry.Registry('sparse attention')
register = _REGISTRY.register
get = _REGISTRY.get

BlockSizes = bt.BlockSizes
BlockTables = bt.BlockTables


def prefix_for(mask):
  """The kernels' prefix_len: a non-causal mask is a prefix covering all keys."""
  return mask.prefix_len if mask.causal else mask.kv_len


def check_inputs(q, k, v, mask, tables, block_sizes):
  b, t, hq, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  if k.shape != v.shape or hq % hkv:
    raise ValueError(f'sparse_attend: q {q.shape}, k {k.shape}, v {v.shape} disagree')
  if t % block_sizes.block_q or s % block_sizes.block_k:
    raise ValueError(f'sparse_attend: seq lengths (T={t}, S={s}) must be multiples of '
                     f'{block_sizes.block_q=} and {block_sizes.block_k=}')
  want = (b, hkv, t // block_sizes.block_q)
  if tables.kv_ids.shape[:3] != want or tables.kv_count.shape != want:
    raise ValueError(f'sparse_attend: tables kv_ids {tables.kv_ids.shape} / kv_count '
                     f'{tables.kv_count.shape} must start with (B, Hkv, nQ)={want}')


def sparse_attend(q, k, v, mask, tables, *, block_sizes, implementation='auto'):
  """Attention over only the tiles listed in `tables`; [B, T, Hq, D] out.

  For training and prefill: queries start at position 0 (mask.q_offset is
  ignored); decode steps against a cache have their own kernel.
  """
  check_inputs(q, k, v, mask, tables, block_sizes)
  fn = get(implementation)
  return partition.per_shard(
      lambda q, k, v, mask, tables: fn(q, k, v, mask, tables, block_sizes),
      (q, k, v, mask, tables), (partition.Q, partition.KV, partition.KV, partition.PER_ROW,
                                partition.PER_KV_HEAD), partition.Q)


@register('reference')
def _reference(q, k, v, mask, tables, block_sizes):
  n_k = k.shape[1] // block_sizes.block_k
  block_mask = bt.block_mask_from_tables(tables.kv_ids, tables.kv_count, n_k)
  return reference.reference_sparse_attention(
      q, k, v, block_mask, mask.kv_len, prefix_for(mask), block_sizes=block_sizes)


@register('mosaic')
def _mosaic(q, k, v, mask, tables, block_sizes, persistent=False):
  """Hopper: the FA3-style Mosaic GPU forward and backward kernels, the forward
  with one CTA a tile."""
  from pallas_kernels.sparse_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  if not _is_hopper():
    raise NotImplementedError("sparse kernels 'mosaic' and 'mosaic_persistent' need a Hopper "
                              "GPU (sm_90)")
  config = mosaic_gpu.Config(persistent_ctas=jax.devices()[0].core_count if persistent else 0)
  return mosaic_gpu.sparse_attention(q, k, v, tables, mask.kv_len, prefix_for(mask),
                                     block_sizes=block_sizes, config=config)


@register('mosaic_persistent')
def _mosaic_persistent(q, k, v, mask, tables, block_sizes):
  """'mosaic' with its forward as one wave of CTAs (the SM count) looping over
  the tiles (mosaic_gpu.Config.persistent_ctas): 'auto' on Hopper. At 65%
  sparsity its kernel was 1-9% faster at 4k-16k on an H200 (docs/results.md)."""
  return _mosaic(q, k, v, mask, tables, block_sizes, persistent=True)


def _is_hopper():
  dev = jax.devices()[0]
  return dev.platform == 'gpu' and getattr(dev, 'compute_capability', '').startswith('9')


@register('auto')
def _auto(q, k, v, mask, tables, block_sizes):
  """Mosaic (persistent) on Hopper where its shapes fit, Triton on other GPUs,
  the TPU kernel on TPU, and the jnp reference on CPU (interpreters are for tests)."""
  from pallas_kernels.sparse_attention import mosaic_gpu  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if backend == 'gpu':
    if _is_hopper() and mosaic_gpu.unsupported(q, k, block_sizes) is None:
      return _mosaic(q, k, v, mask, tables, block_sizes, persistent=True)
    return _triton(q, k, v, mask, tables, block_sizes)
  if backend == 'tpu':
    return _tpu(q, k, v, mask, tables, block_sizes)
  return _reference(q, k, v, mask, tables, block_sizes)


@register('tpu')
def _tpu(q, k, v, mask, tables, block_sizes):
  """Pallas Mosaic-TPU kernel. On a CPU host it runs in Pallas' generic
  interpreter (interpret=True, ~3x faster than pltpu.InterpretParams())."""
  from pallas_kernels.sparse_attention import tpu  # pylint: disable=g-import-not-at-top
  return tpu.sparse_attention(q, k, v, tables, mask.kv_len, prefix_for(mask),
                              block_sizes=block_sizes,
                              interpret=jax.default_backend() == 'cpu')


# ---------------------------------------------------- Pallas Triton (#10) ---

def _triton_interpret():
  """Triton runs natively on a GPU and in Pallas' interpreter on a CPU host;
  anywhere else (TPU) it cannot run, so a fallback list moves on."""
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  if backend not in ('gpu', 'cpu'):
    raise NotImplementedError(
        f"sparse kernel 'triton' needs a GPU or CPU; backend is {backend!r}")
  return backend == 'cpu'


@register('triton')
def _triton(q, k, v, mask, tables, block_sizes):
  """Pallas-Triton forward + dq + dk/dv kernels (differentiable in q, k, v)."""
  from pallas_kernels.sparse_attention import triton  # pylint: disable=g-import-not-at-top
  return triton.sparse_attention(q, k, v, tables, mask.kv_len, prefix_for(mask),
                                 block_sizes=block_sizes,
                                 interpret=_triton_interpret())


_DECODE = registry.Registry('sparse decode')
# (q, k_cache, v_cache, mask, then two per-kv-head arrays: kv_ids/kv_count or scores/cutoff)
_DECODE_LAYOUTS = (partition.Q, partition.KV, partition.KV, partition.PER_ROW,
                   partition.PER_KV_HEAD, partition.PER_KV_HEAD)


def sparse_decode(q, k_cache, v_cache, mask, kv_ids, kv_count, *, block_k,
                  implementation):
  """M new tokens against a KV cache, over only the selected key blocks.

  q [B, M, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; mask a MaskSpec whose
  q_offset is the absolute position of new token 0 and kv_len the filled cache
  length; kv_ids [B, Hkv, max_k] / kv_count [B, Hkv] the selected blocks of
  block_k keys. Returns [B, M, Hq, D]; implementation 'reference' | 'triton'
  | 'auto'.
  """
  if k_cache.shape[1] % block_k:
    raise ValueError(f'sparse_decode: cache length {k_cache.shape[1]} must be a '
                     f'multiple of {block_k=}')
  fn = _DECODE.get(implementation)
  return partition.per_shard(lambda *args: fn(*args, block_k),
                             (q, k_cache, v_cache, mask, kv_ids, kv_count), _DECODE_LAYOUTS,
                             partition.Q)


@_DECODE.register('reference')
def _decode_reference(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k):
  return decode.sparse_decode_reference(
      q, k_cache, v_cache, kv_ids, kv_count, mask.kv_len, prefix_for(mask),
      mask.q_offset, block_k=block_k)


@_DECODE.register('triton')
def _decode_triton(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k):
  return decode.sparse_decode(
      q, k_cache, v_cache, kv_ids, kv_count, mask.kv_len, prefix_for(mask),
      mask.q_offset, block_k=block_k, interpret=_triton_interpret())


@_DECODE.register('mosaic')
def _decode_mosaic(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k):
  """Hopper, one new token a row: the TMA-fed Mosaic GPU kernel
  (mosaic_gpu_decode; its step 1.2x faster than the Triton table
  kernel's at batch 8, cache 32k on an H200, docs/results.md). Other shapes:
  Triton on a GPU where its tiles fit, else the jnp reference."""
  from pallas_kernels.sparse_attention import mosaic_gpu_decode  # pylint: disable=g-import-not-at-top
  if _is_hopper() and mosaic_gpu_decode.unsupported(q, k_cache, block_k) is None:
    return mosaic_gpu_decode.sparse_decode(
        q, k_cache, v_cache, kv_ids, kv_count, mask.kv_len, prefix_for(mask),
        mask.q_offset, block_k=block_k)
  return _decode_gpu_or_reference(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k)


@_DECODE.register('auto')
def _decode_auto(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k):
  """Mosaic on Hopper where it applies (one new token), else Triton on a GPU
  where its tiles fit, else the jnp reference (on a CPU host the
  interpreters are for tests)."""
  return _decode_mosaic(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k)


def _decode_gpu_or_reference(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k):
  if jax.default_backend() == 'gpu' and _triton_tiles_fit(block_k, q.shape[-1]):
    return _decode_triton(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k)
  return _decode_reference(q, k_cache, v_cache, mask, kv_ids, kv_count, block_k)


def _triton_tiles_fit(block_k, head_dim):
  try:
    triton_common.check_pow2(block_k=block_k, head_dim=head_dim)
  except ValueError:
    return False
  return True


def decode_implementation(kernel):
  """The sparse_decode implementation for a model.sparse.kernel: itself where
  it has a decode version ('mosaic_persistent': 'mosaic'), else 'auto' ('tpu'
  has none)."""
  kernel = {'mosaic_persistent': 'mosaic'}.get(kernel, kernel)
  return kernel if kernel in _DECODE.names() else 'auto'


def decode_selection_fused(implementation):
  """Whether a learned gate's decode step selects in one kernel
  (gate_decode_tables): on a GPU unless sparse_decode's `implementation` is
  'reference', and for 'triton' on a CPU host (Pallas' interpreter: tests)."""
  backend = jax.default_backend()
  return ((backend == 'gpu' and implementation != 'reference')
          or (backend == 'cpu' and implementation == 'triton'))


def gate_decode_tables(logits, mask, threshold, coverage, *, block_k, num_new, top_k,
                       use_coverage, max_k, group=None):
  """A learned gate's decode-step tables from its logits [B, Hkv, G, nK] in
  one kernel (pallas_kernels/sparse_attention/gate_select.py): the softmax
  over visible key blocks averaged over the GQA group (its first `group`
  heads; None: all G), the rule (threshold, top_k, coverage; forced blocks
  kept) and the tables, kv_ids [B, Hkv, >= max_k] in rank order and kv_count
  [B, Hkv]."""
  from pallas_kernels.sparse_attention import gate_select  # pylint: disable=g-import-not-at-top

  def tables(logits, mask, threshold, coverage):
    return gate_select.decode_tables(
        logits, mask.q_offset, mask.kv_len, prefix_for(mask), threshold, coverage,
        causal=mask.causal, block_k=block_k, num_new=num_new, top_k=top_k,
        use_coverage=use_coverage, max_k=max_k, group=group, interpret=_triton_interpret())
  return partition.per_shard(tables, (logits, mask, threshold, coverage),
                             (partition.PER_KV_HEAD, partition.PER_ROW, (), ()),
                             [partition.PER_KV_HEAD, partition.PER_KV_HEAD])


def gate_step_logits(q, k, stats, gate_key, q_proj_t, k_proj_t, mask, freq, *, block_k):
  """A learned gate's decode step up to its logits in one kernel
  (pallas_kernels/sparse_attention/gate_step.py): one new token's pre-rotary
  key k [B, Hkv, D] folded into the cache's key statistics `stats` (f32
  [B, nK, Hkv, D] each) and its block's gate key re-projected (gate_key
  [B, Hkv, nK, gate_dim]), its query q [B, Hkv, G, D] projected (the
  projections transposed: q_proj_t [Hkv, G, gate_dim, D], k_proj_t [Hkv,
  gate_dim, 3D]), rotated (freq: the rotary inverse frequencies) and scored
  against every gate key. Returns (logits f32 [B, Hkv, G', nK], stats,
  gate_key): G' is G rounded up to a power of two, the padding heads' logits
  0 (gate_decode_tables' group argument masks them)."""
  from pallas_kernels.sparse_attention import gate_step  # pylint: disable=g-import-not-at-top

  def step(q, k, stats, gate_key, q_proj_t, k_proj_t, mask, freq):
    return gate_step.decode_logits(q, k, stats, gate_key, q_proj_t, k_proj_t, mask.q_offset,
                                   mask.kv_len, freq, block_k=block_k,
                                   interpret=_triton_interpret())
  per_head = ('kv_heads',)
  return partition.per_shard(
      step, (q, k, stats, gate_key, q_proj_t, k_proj_t, mask, freq),
      (partition.PER_KV_HEAD, partition.PER_KV_HEAD, partition.KV, partition.PER_KV_HEAD,
       per_head, per_head, partition.PER_ROW, ()),
      [partition.PER_KV_HEAD, partition.KV, partition.PER_KV_HEAD])


_DECODE_SCORED = registry.Registry('scored sparse decode')


def sparse_decode_scored(q, k_cache, v_cache, mask, scores, cutoff, *, block_k,
                         rule='keep_min', implementation):
  """sparse_decode with the selection fused into the kernel: no block tables.

  scores f32 [B, Hkv, S // block_k] per-block scores (e.g. the gate's, of this
  step's query against the cached blocks' summaries); cutoff [B, Hkv] the
  row's keep_min (rule 'keep_min') or its budget of non-forced blocks (rule
  'top_k'). Block 0 and the new tokens' blocks are always read, blocks past
  kv_len never (pallas_kernels/sparse_attention/block_cutoff.py). Returns
  [B, M, Hq, D]; implementation 'reference' | 'triton'.
  """
  decode.check_scored_inputs(q, k_cache, v_cache, scores, cutoff, block_k=block_k,
                             rule=rule)
  fn = _DECODE_SCORED.get(implementation)
  return partition.per_shard(lambda *args: fn(*args, block_k, rule),
                             (q, k_cache, v_cache, mask, scores, cutoff), _DECODE_LAYOUTS,
                             partition.Q)


@_DECODE_SCORED.register('reference')
def _decode_scored_reference(q, k_cache, v_cache, mask, scores, cutoff, block_k, rule):
  return decode.sparse_decode_scored_reference(
      q, k_cache, v_cache, scores, cutoff, mask.kv_len, prefix_for(mask),
      mask.q_offset, block_k=block_k, rule=rule)


@_DECODE_SCORED.register('triton')
def _decode_scored_triton(q, k_cache, v_cache, mask, scores, cutoff, block_k, rule):
  return decode.sparse_decode_scored(
      q, k_cache, v_cache, scores, cutoff, mask.kv_len, prefix_for(mask),
      mask.q_offset, block_k=block_k, rule=rule, interpret=_triton_interpret())
