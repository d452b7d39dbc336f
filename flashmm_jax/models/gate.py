"""The learned block gate of dynamic sparse attention (issue #10), as an NNX module.

Split from ops/sparse_gate.py by the import rules: the gate's params need
models.layers.param (logical axes) and ops/ does not import models/, so the
parameter-free math (pooling, selection, target, KL, statistics) lives in
ops.sparse_gate and this file holds the projections and the sparse paths of
one attention layer: gate -> selection -> tables -> ops.sparse_attention,
for training and prefill (attend) and, with config.model.sparse.decode, for
decode steps against the KV cache (attend_decode).

The gate reads the layer's q, k under stop_gradient: its only training
signal is the distillation KL (train.gate_loss_weight), and that KL never
pulls on the LM's own projections. The selection is not differentiable, so
the LM loss does not reach the gate either.

Statistics and the KL leave the model as nnx.Intermediate values, recorded
only inside `nnx.capture(..., nnx.Intermediate)` (the train step and the eval
decoder do that); `layer_stats` and `sparsity_metrics` turn them into named
figures.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np

from flashmm_jax import ops
from flashmm_jax.models import layers
from flashmm_jax.ops import sparse_gate as sg
from pallas_kernels.sparse_attention import block_tables as bt

# The attribute name in Attention: params sit under .../attn/block_gate/, which
# is how train.trainable='gate' and train.init_from find them.
GATE_NAME = 'block_gate'
# The config.model.sparse keys that only choose blocks: an eval can change them
# on a trained gate (set_selection), unlike block sizes or the gate's width.
SELECTION_KEYS = ('threshold', 'top_k', 'coverage')
# The KV-cache entry beside sg.KEY_STATS: each key block's gate key (its pooled
# statistics projected and rotated, f32 [B, Hkv, nK, gate_dim]: head-major, the
# batch dimensions of the logits' einsum leading). A decode step
# re-projects the block its new token lands in and reads the rest: before, it
# re-pooled and re-projected every block, [B, nK, Hkv, 3D] f32 written and read
# again each step: two kernels of 12.2 and 10.2 us in a layer step of 148 us of
# kernels at batch 8, cache 32k; the step 0.159 -> 0.132 ms (H200,
# benchmarks/layer_decode.py, docs/results.md).
GATE_KEY = 'gate_key'
# The gate's einsums in full f32 on every backend: a decode step's one-kernel
# path (gate_step) computes them so, and a block near the selection's cutoff
# would otherwise land on either side of it (TF32 on a GPU).
_EXACT = jax.lax.Precision.HIGHEST
# KV-cache counters of a layer's sparse decode steps, f32 [B]: the key blocks
# they read and the blocks visible to them, summed over steps and kv heads. A
# decode loop carries them in the cache (a sown value would leak its tracers)
# and record_decode_counts reports them once it ends; rows that finished
# early still count, as their steps still run. Only with count_decode
# (set_count_decode: the eval's decoder): counting is a kernel a step, 1.2
# us of a layer's ~90 at batch 8, cache 32k on an H200.
DECODE_COUNTS = ('decode_kept', 'decode_visible')


class SelectionValue(nnx.Variable):
  """A gate's threshold or coverage: model state that is never trained (not an
  nnx.Param) and not a static attribute, so a jitted caller takes it as an
  argument and a sweep over it (eval.py --sweep) compiles once. top_k stays
  static: it sets the tables' width."""


def check_sparse_config(sp):
  """Fails at build time on a bad config.model.sparse."""
  if sp.block_q < 1 or sp.block_k < 1:
    raise ValueError(f'config.model.sparse block_q={sp.block_q}, block_k={sp.block_k} must be >= 1')
  if sp.gate_dim < 2 or sp.gate_dim % 2:
    raise ValueError(f'config.model.sparse.gate_dim={sp.gate_dim} must be even (rotary pairs)')
  sg.check_rule(sp.threshold, sp.top_k, sp.coverage, where='config.model.sparse.')
  for key in ('decode', 'dense_text'):
    if not isinstance(sp.get(key, False), bool):
      raise ValueError(f'config.model.sparse.{key}={sp[key]!r} must be True or False')
  if sp.decode and sp.get('dense_text', False):
    raise ValueError('config.model.sparse.decode and dense_text are both True: decode steps '
                     'are text, which dense_text keeps dense; set one of them')
  if sp.target not in sg.TARGETS:
    raise ValueError(f'config.model.sparse.target={sp.target!r} must be one of {sg.TARGETS}')
  ops.sparse_attention.get(sp.kernel)  # unknown kernel names fail here


def _record(module, name, value):
  # sow outside nnx.capture is deprecated and would grow the module's state on
  # every call (retracing jitted callers), so record only when captured.
  if hasattr(module, '__captures__'):
    module.sow(nnx.Intermediate, name, value, reduce_fn=lambda _, new: new,
               init_fn=lambda: None)


class BlockGate(nnx.Module):
  """Scores (query block, key block) pairs for one attention layer and runs its
  sparse path. Query projection per query head, key projection per kv head."""

  def __init__(self, num_heads, num_kv_heads, head_dim, cfg, rope_base, *, rngs):
    sp = cfg.sparse
    check_sparse_config(sp)
    _, param_dtype = layers.dtypes(cfg)
    self.block_sizes = bt.BlockSizes(sp.block_q, sp.block_k)
    self.threshold = SelectionValue(jnp.float32(sp.threshold))
    self.coverage = SelectionValue(jnp.float32(sp.coverage))
    self.top_k, self.target = int(sp.top_k), sp.target
    self.use_coverage = sp.coverage > 0   # static: whether the top-p sort runs at all
    self.kernel, self.min_kv_blocks = sp.kernel, int(sp.min_kv_blocks)
    self.decode = sp.decode  # decode steps take the sparse path too
    self.decode_kernel = ops.sparse_attention.decode_implementation(sp.kernel)
    self.rope_base, self.head_dim, self.num_kv_heads = rope_base, head_dim, num_kv_heads
    self.group = num_heads // num_kv_heads
    self.distill = False  # set by the train step when the KL is in the loss
    self.count_decode = False  # set by the eval's decoder (DECODE_COUNTS)
    # First position whose query tiles keep every key block (None: none do); set
    # by the model that knows where its text starts (set_dense_from).
    self.dense_from = None
    init = nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                             in_axis=1, out_axis=2, batch_axis=(0,))
    self.q_proj = layers.param(rngs, init, (num_heads, head_dim, sp.gate_dim),
                               ('heads', 'head_dim', None), param_dtype)
    self.k_proj = layers.param(rngs, init, (num_kv_heads, 3 * head_dim, sp.gate_dim),
                               ('kv_heads', None, None), param_dtype)

  def applies(self, num_keys):
    """Whether a sequence is long enough for the sparse path (else dense is fine)."""
    return math.ceil(num_keys / self.block_sizes.block_k) >= self.min_kv_blocks

  def log_probs(self, q, k, mask, visible, num_queries):
    """Pre-rotary q [B, T, Hq, D], k [B, S, Hkv, D] (padded to the blocks) ->
    log-probabilities over key blocks [B, Hkv, nQ, nK], one per GQA group."""
    bq = self.block_sizes.block_q
    pooled_q = sg.pool_queries(q, bq, num_queries)
    n_q = pooled_q.shape[1]
    q_start = jnp.broadcast_to(jnp.arange(n_q) * bq, (q.shape[0], n_q))
    pooled_k = sg.pool_keys(k, self.block_sizes.block_k, mask.kv_len)
    return self._score(pooled_q, q_start, self._gate_keys(pooled_k), visible)

  def _gate_keys(self, pooled_k, blocks=None):
    """Pooled key statistics [B, n, Hkv, 3D] of key blocks `blocks` (int [B, n];
    default 0 .. n-1) -> their gate keys [B, Hkv, n, gate_dim] (GATE_KEY's
    layout), rotated at each block's first position (so a score sees relative
    offsets)."""
    if blocks is None:
      blocks = jnp.broadcast_to(jnp.arange(pooled_k.shape[1]), pooled_k.shape[:2])
    gk = jnp.einsum('bkhe,heg->bkhg', pooled_k, self.k_proj[...].astype(jnp.float32),
                    precision=_EXACT)
    return jnp.swapaxes(layers.rope(gk, blocks * self.block_sizes.block_k, self.rope_base), 1, 2)

  def _logits(self, pooled_q, q_start, gk):
    """Pooled pre-rotary queries [B, nQ, Hq, D] of blocks starting at q_start
    [B, nQ] and gate keys gk [B, Hkv, nK, gate_dim] -> logits [B, Hkv, G, nQ, nK]."""
    gq = jnp.einsum('bqhd,hdg->bqhg', pooled_q, self.q_proj[...].astype(jnp.float32),
                    precision=_EXACT)
    gq = layers.rope(gq, q_start, self.rope_base)
    b, n_q, hq, g_dim = gq.shape
    gq = gq.reshape(b, n_q, hq // self.group, self.group, g_dim)
    return jnp.einsum('bqkgd,bkpd->bkgqp', gq, gk, precision=_EXACT) * g_dim ** -0.5

  def _score(self, pooled_q, q_start, gk, visible):
    """_logits -> log-probs [B, Hkv, nQ, nK] over the visible key blocks."""
    return sg.gate_log_probs(self._logits(pooled_q, q_start, gk), visible)

  def _keep(self, log_p, visible, forced):
    """The selection rule (threshold, top_k, coverage) on gate log-probs."""
    return sg.select_blocks(jnp.exp(log_p), visible, forced, threshold=self.threshold[...],
                            top_k=self.top_k,
                            coverage=self.coverage[...] if self.use_coverage else 0.0)

  def select(self, q_raw, k_raw, mask, num_queries, num_keys):
    """Padded pre-rotary q, k -> (log-probs [B, Hkv, nQ, nK], visible tiles
    [B, nQ, nK], selected block mask [B, Hkv, nQ, nK])."""
    bs = self.block_sizes
    n_q, n_k = q_raw.shape[1] // bs.block_q, k_raw.shape[1] // bs.block_k
    visible = sg.visible_tiles(mask, num_queries, num_keys, n_q, n_k, bs)
    log_p = self.log_probs(jax.lax.stop_gradient(q_raw), jax.lax.stop_gradient(k_raw),
                           mask, visible, num_queries)
    forced = sg.forced_tiles(n_q, n_k, bs, self.dense_from)
    return log_p, visible, self._keep(log_p, visible, forced)

  def attend(self, q_raw, k_raw, q, k, v, mask):
    """Sparse attention from position 0 (training or prefill): [B, T, Hq, D].

    q_raw, k_raw: the layer's q, k before rotary (the gate's input); q, k, v:
    what attention uses. Lengths that are not block multiples are padded here
    (padded keys lie beyond kv_len, so they are masked) and sliced back.
    """
    bs = self.block_sizes
    t, s = q.shape[1], k.shape[1]
    q_raw, q = (sg.pad_axis(x, 1, bs.block_q) for x in (q_raw, q))
    k_raw, k, v = (sg.pad_axis(x, 1, bs.block_k) for x in (k_raw, k, v))
    log_p, visible, selected = self.select(q_raw, k_raw, mask, t, s)
    width = sg.table_width(*selected.shape[2:], bs, self.top_k, self.dense_from)
    tables = bt.build_block_tables(selected, max_k=width)
    out = ops.sparse_attention.sparse_attend(q, k, v, mask, tables, block_sizes=bs,
                                             implementation=self.kernel)
    stats = sg.tile_stats(selected, visible, block_sizes=bs, head_dim=self.head_dim,
                          group=self.group)
    for name, value in stats.items():
      _record(self, name, value)
    if self.distill:
      target = sg.block_attention_target(q, k, mask, block_sizes=bs, num_queries=t,
                                         kind=self.target)
      _record(self, 'gate_kl', sg.gate_kl(target, log_p))
    return out[:, :t]

  def empty_key_stats(self, batch, length):
    """The KV-cache entries (sg.KEY_STATS, GATE_KEY; DECODE_COUNTS with
    count_decode) of a cache of `length` positions (a block multiple) before
    any key is written: an empty block's gate key is 0, as its pooled
    statistics are."""
    n_k, gate_dim = length // self.block_sizes.block_k, self.q_proj[...].shape[-1]
    gate_key = jnp.zeros((batch, self.num_kv_heads, n_k, gate_dim), jnp.float32)
    counts = {name: jnp.zeros((batch,), jnp.float32)
              for name in DECODE_COUNTS if self.count_decode}
    return dict(sg.empty_key_stats(batch, n_k, self.num_kv_heads, self.head_dim),
                **{GATE_KEY: gate_key}, **counts)

  def fold_keys(self, cache, k_raw, mask):
    """The cache with this call's pre-rotary keys k_raw [B, T, Hkv, D], at
    positions q_offset + t, folded into its key-block statistics, and the gate
    keys of the blocks they changed: one new token changes one block (the
    blocks before it are full, those after it empty); a prefill, all."""
    bk = self.block_sizes.block_k
    positions = mask.q_offset[:, None] + jnp.arange(k_raw.shape[1])
    cache = dict(cache, **sg.fold_key_stats(cache, k_raw, positions, mask.kv_len, bk))
    if k_raw.shape[1] > 1:
      return dict(cache, **{GATE_KEY: self._gate_keys(
          sg.pooled_key_stats(cache, mask.kv_len, bk))})
    n_k = cache[GATE_KEY].shape[2]
    blocks = jnp.minimum(positions // bk, n_k - 1)
    new = self._gate_keys(sg.pooled_key_stats(cache, mask.kv_len, bk, blocks), blocks)
    # A token at or past kv_len is padding: its block stays, as in fold_key_stats.
    real = positions < jnp.asarray(mask.kv_len)[:, None]
    rows = jnp.arange(k_raw.shape[0])[:, None]
    at = cache[GATE_KEY].at[rows, :, jnp.where(real, blocks, n_k)]   # [B, T, Hkv, gate_dim]
    return dict(cache, **{GATE_KEY: at.set(jnp.swapaxes(new, 1, 2), mode='drop')})

  def select_decode(self, q_raw, cache, mask):
    """A decode step's key blocks [B, Hkv, 1, nK]: the prefill's gate and rule,
    with the step's M new tokens (pre-rotary q_raw [B, M, Hq, D], starting at
    q_offset) as the query block and the cache's gate keys, those of its
    key-block statistics, which hold every key < kv_len (fold_keys)."""
    return self._decode_keep(self._decode_logits(q_raw, cache, mask), mask, q_raw.shape[1],
                             cache['k'].shape[1] // self.block_sizes.block_k)

  def _decode_keep(self, logits, mask, m, n_k):
    """select_decode's rule on a decode step's logits [B, Hkv, G, 1, nK]."""
    bk = self.block_sizes.block_k
    visible = sg.visible_tiles(mask, m, n_k * bk, 1, n_k, bt.BlockSizes(m, bk))
    log_p = sg.gate_log_probs(logits, visible)
    return self._keep(log_p, visible, sg.forced_decode_blocks(mask.q_offset, m, n_k, bk))

  def _decode_logits(self, q_raw, cache, mask):
    """A decode step's gate logits [B, Hkv, G, 1, nK]: its new tokens (pre-rotary
    q_raw [B, M, Hq, D] at q_offset) as one query block against the cache's
    gate keys."""
    m = q_raw.shape[1]
    return self._logits(sg.pool_queries(q_raw, m, m), mask.q_offset[:, None], cache[GATE_KEY])

  def decode_tables(self, q_raw, cache, mask):
    """The kv tables (ids [B, Hkv, >= width], count [B, Hkv]) of select_decode's
    blocks, from a cache that holds the step's keys (fold_keys)."""
    return self._tables(self._decode_logits(q_raw, cache, mask)[:, :, :, 0], mask,
                        q_raw.shape[1], cache['k'].shape[1] // self.block_sizes.block_k)

  def _tables(self, logits, mask, m, n_k):
    """The kv tables of a decode step's logits [B, Hkv, G', nK] (its first
    `group` heads real). On a GPU the softmax, the rule and the tables are one
    kernel (ops.sparse_attention.gate_decode_tables), ~20 XLA kernels
    otherwise; its ids are in rank order, the same blocks up to rounding."""
    bk = self.block_sizes.block_k
    width = sg.decode_table_width(n_k, m, bk, self.top_k)
    if ops.sparse_attention.decode_selection_fused(self.decode_kernel):
      return ops.sparse_attention.gate_decode_tables(
          logits, mask, self.threshold[...], self.coverage[...], block_k=bk, num_new=m,
          top_k=self.top_k, use_coverage=self.use_coverage, max_k=width, group=self.group)
    keep = self._decode_keep(logits[:, :, :self.group, None], mask, m, n_k)
    return bt.compact_rows(keep[:, :, 0], width)

  def step_tables(self, q_raw, k_raw, cache, mask):
    """A decode step's selection from the cache before its keys are folded in:
    (kv_ids, kv_count, the cache with fold_keys' entries). On a GPU one new
    token's fold, gate key, query projection and logits are one kernel
    (ops.sparse_attention.gate_step_logits), ~11 XLA kernels otherwise."""
    m, n_k = q_raw.shape[1], cache['k'].shape[1] // self.block_sizes.block_k
    if self._step_fused(m):
      logits, cache = self._step_logits(q_raw, k_raw, cache, mask)
    else:
      cache = self.fold_keys(cache, k_raw, mask)
      logits = self._decode_logits(q_raw, cache, mask)[:, :, :, 0]
    return (*self._tables(logits, mask, m, n_k), cache)

  def _step_fused(self, m):
    """Whether step_tables takes the one-kernel step: one new token, the
    fused selection's backends, power-of-two head_dim and gate_dim / 2."""
    pow2 = lambda n: n & (n - 1) == 0
    return (m == 1 and ops.sparse_attention.decode_selection_fused(self.decode_kernel)
            and pow2(self.head_dim) and pow2(self.q_proj[...].shape[-1] // 2))

  def _step_logits(self, q_raw, k_raw, cache, mask):
    """step_tables' one kernel: (logits [B, Hkv, G', nK], cache), G' the group
    rounded up to a power of two (the padding heads' logits are 0)."""
    b, _, _, d = q_raw.shape
    hkv, group = self.num_kv_heads, self.group
    g_dim = self.q_proj[...].shape[-1]
    # The kernel's layout of the projections (gate_step._project): a transpose
    # of the params, which XLA hoists out of generate's while_loop (H200, the
    # small model). The kernel reads a group of 3 as it is; padding it to 4
    # here cost no more, since the step materialises its q for the kernel
    # either way (a pad fusion then, a slice now; docs/results.md).
    q_proj_t = jnp.swapaxes(self.q_proj[...].reshape(hkv, group, d, g_dim), 2, 3)
    k_proj_t = jnp.swapaxes(self.k_proj[...], 1, 2)
    logits, stats, gate_key = ops.sparse_attention.gate_step_logits(
        q_raw.reshape(b, hkv, group, d), k_raw[:, 0], tuple(cache[name] for name in sg.KEY_STATS),
        cache[GATE_KEY], q_proj_t, k_proj_t, mask,
        layers.rope_frequencies(g_dim, self.rope_base), block_k=self.block_sizes.block_k)
    return logits, dict(cache, **dict(zip(sg.KEY_STATS, stats)), **{GATE_KEY: gate_key})

  def record_decode_counts(self, cache):
    """Records, after a decode loop, this layer's DECODE_COUNTS from its final
    cache as decode_kept_blocks / decode_visible_blocks / decode_flops_saved
    (f32 scalars summed over rows; FLOPs: q.k and p.v of the blocks not read,
    4 * block_k * head_dim per query head and new token). Only under
    nnx.capture, as the prefill's tile statistics."""
    kept, visible = (cache[name].sum() for name in DECODE_COUNTS)
    _record(self, 'decode_kept_blocks', kept)
    _record(self, 'decode_visible_blocks', visible)
    per_block = sg.tile_flops(1, self.block_sizes.block_k, self.head_dim, self.group)
    _record(self, 'decode_flops_saved', (visible - kept) * per_block)

  def attend_decode(self, q_raw, k_raw, q, cache, mask):
    """A sparse decode step: (out [B, M, Hq, D], cache): the step's pre-rotary
    keys k_raw folded into the cache's gate entries (its k, v already
    written), q over the cache blocks select_decode keeps.

    A cache with DECODE_COUNTS (made under count_decode) gets the blocks read
    and visible added (a decode step sees every key below kv_len = q_offset + M).
    """
    bk = self.block_sizes.block_k
    kv_ids, kv_count, cache = self.step_tables(q_raw, k_raw, cache, mask)
    k, v = cache['k'].astype(q.dtype), cache['v'].astype(q.dtype)
    out = ops.sparse_attention.sparse_decode(q, k, v, mask, kv_ids, kv_count, block_k=bk,
                                             implementation=self.decode_kernel)
    if DECODE_COUNTS[0] in cache:
      visible = jnp.minimum(-(-jnp.asarray(mask.kv_len) // bk), k.shape[1] // bk)
      counts = (kv_count.sum(1), visible * self.num_kv_heads)
      cache = dict(cache, **{name: cache[name] + n.astype(jnp.float32)
                             for name, n in zip(DECODE_COUNTS, counts)})
    return out, cache


def gates(model):
  """Every BlockGate in a model."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, BlockGate)]


def set_selection(model, **rule):
  """Changes the selection rule (threshold, top_k, coverage) of every gate, e.g.
  to sweep it over one trained gate. Jitted callers take the new threshold and
  coverage as arguments; a new top_k, or coverage turned on or off, retraces."""
  unknown = set(rule) - set(SELECTION_KEYS)
  if unknown:
    raise ValueError(f'selection keys {sorted(unknown)} unknown; valid: {SELECTION_KEYS}')
  current = selection_rule(model)
  for g in gates(model):
    merged = {key: rule.get(key, current[key]) for key in SELECTION_KEYS}
    sg.check_rule(**merged)
    g.threshold.set_value(jnp.float32(merged['threshold']))
    g.coverage.set_value(jnp.float32(merged['coverage']))
    g.top_k, g.use_coverage = int(merged['top_k']), merged['coverage'] > 0


def parse_rule(text, flag='rule'):
  """"threshold=0,coverage=0.9" -> {'threshold': 0.0, 'coverage': 0.9}."""
  rule = {}
  for item in text.split(','):
    key, sep, value = item.partition('=')
    if not sep or key not in SELECTION_KEYS:
      raise ValueError(f'{flag} item {item!r} must be KEY=VALUE with KEY in {SELECTION_KEYS}')
    rule[key] = int(value) if key == 'top_k' else float(value)
  return rule


def rule_name(rule):
  """A parsed rule as a directory name: {'threshold': 0.0, 'coverage': 0.9} ->
  'threshold0.0_coverage0.9' (what eval.py --sweep writes under)."""
  return '_'.join(f'{k}{v}' for k, v in rule.items())


def selection_rule(model):
  """The first gate's selection rule as a dict ({} for a dense model)."""
  found = gates(model)
  if not found:
    return {}
  g = found[0]
  # The shortest decimal of the float32 state: the value as it was set (0.3, not 0.30000001).
  as_set = lambda v: float(str(np.float32(v[...])))
  return {'threshold': as_set(g.threshold), 'top_k': g.top_k, 'coverage': as_set(g.coverage)}


def set_dense_from(model, position):
  """Query tiles holding positions >= position keep every key block, in
  training and prefill."""
  for g in gates(model):
    g.dense_from = int(position)


def set_count_decode(model, on):
  """Turns the decode steps' counters (DECODE_COUNTS) on or off; a cache made
  after (decode.init_cache) holds them."""
  for g in gates(model):
    g.count_decode = bool(on)


def set_distill(model, on):
  """Turns the distillation target (a dense pass per layer) on or off."""
  for g in gates(model):
    g.distill = bool(on)


def _layer_of(path):
  """The decoder block index in a state path (..., 'blocks', i, ...)."""
  keys = list(path)
  return int(keys[keys.index('blocks') + 1])


def layer_stats(intermediates):
  """Captured gate values -> {name: f32 [num sparse layers]}, in layer order.

  Empty when no layer took the sparse path (dense model, short sequence).
  """
  by_name = {}
  for path, var in nnx.to_flat_state(intermediates):
    if GATE_NAME in path:
      by_name.setdefault(path[-1], []).append((_layer_of(path), var.get_value()))
  return {name: jnp.stack([v for _, v in sorted(items, key=lambda x: x[0])])
          for name, items in by_name.items()}


def sparsity_metrics(stats):
  """Named figures from layer_stats (or their sums over batches): sparsity per
  layer and overall, relative to the visible tiles; forward attention FLOPs
  saved; the gate KL; and, from a decode loop (record_decode_counts), the
  same for its sparse steps. Every LM layer has a gate, so row i is layer i.
  """
  out = {}
  if 'selected_tiles' in stats:
    out |= _kept_figures(stats['selected_tiles'], stats['visible_tiles'], stats['flops_saved'],
                         overall='sparsity/overall', layer='sparsity/layer_',
                         flops='attn_flops_saved')
  if 'gate_kl' in stats:
    out['gate/kl'] = stats['gate_kl'].mean()
  if 'decode_visible_blocks' in stats:
    out |= _kept_figures(stats['decode_kept_blocks'], stats['decode_visible_blocks'],
                         stats['decode_flops_saved'], overall='sparsity/decode',
                         layer='sparsity/decode_layer_', flops='decode_attn_flops_saved')
  return out


def _kept_figures(kept, visible, flops_saved, *, overall, layer, flops):
  """Sparsity overall and per layer (row i of kept / visible) and the FLOPs
  saved, under the given names."""
  sparsity = lambda s, v: 1.0 - s / jnp.maximum(v, 1.0)
  out = {overall: sparsity(kept.sum(), visible.sum()), flops: flops_saved.sum()}
  for i in range(len(kept)):
    out[f'{layer}{i}'] = sparsity(kept[i], visible[i])
  return out
