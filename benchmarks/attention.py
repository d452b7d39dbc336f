"""Block-sparse attention against dense kernels on one GPU, in one run.

  python benchmarks/attention.py --out DIR [--seqs 2048,4096] [--check]

For each sequence length (batch x seq = --tokens, 16 query heads, GQA 4,
head dim 128, bf16) it times, as the median of --repeats batches of --iters
calls: cuDNN and tokamax's mosaic kernel (dense causal), our Mosaic kernel
with every visible tile listed (dense mode), and our kernels at each block
sparsity of --sparsities. Selection (block scores from pooled q/k, a per-row
budget, the tables) is inside the timed region; decode also times
`ours_fused_s*`, the same selection fused into the kernel (no tables). Writes
attention.json and attention.md to --out; --check first compares every kernel
with the jnp reference on small shapes and stops on a mismatch.
"""

import functools
import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import budgets  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.sparse_attention import block_tables as bt  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_backward  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_decode  # noqa: E402
from pallas_kernels.sparse_attention import decode  # noqa: E402
from pallas_kernels.sparse_attention import reference  # noqa: E402
from pallas_kernels.sparse_attention import select_triton  # noqa: E402
from pallas_kernels.sparse_attention import triton  # noqa: E402

# Selection methods only a decode step has (decode_tables).
DECODE_ONLY = ('ranked',)
FLAGS = flags.DEFINE_string('out', '/tmp/attention_bench', 'output folder')
_SEQS = flags.DEFINE_list('seqs', ['2048', '4096', '8192', '16384', '32768'], 'sequence lengths')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.5', '0.65', '0.8'], 'block sparsities')
_SELECT_METHODS = flags.DEFINE_list(
    'select_method', ['fused', 'pallas', 'top_k', 'rank', 'ranked'], 'how the tables are '
    'built: `fused`, the whole selection in select_triton\'s kernels (forward: two, the '
    'fastest end to end on the H200, docs/results.md; decode: one, decode_tables), from '
    'XLA\'s block scores by a block_tables.tables_from_scores method, or (decode only) '
    '`ranked`: select_triton.decode_ranked_tables. The first is used everywhere under the '
    'usual keys (forward: the first but `ranked`; decode: in decode_select_methods\' order); '
    'at 65% every other one is also timed end-to-end (forward: and selection alone): keys '
    'ours_s65_<method>, ours_s65_select_<method>, ours_mosaic_s65_<spec>_<method>')
flags.register_validator(
    'select_method',
    lambda ms: bool(ms) and set(ms) <= {*bt.SELECT_METHODS, 'fused', *DECODE_ONLY},
    f'--select_method: a list of {(*bt.SELECT_METHODS, "fused", *DECODE_ONLY)}')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'batch x seq')
_HEADS = flags.DEFINE_integer('heads', 16, 'query heads')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'key/value heads')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'head dim')
_VARIANTS = flags.DEFINE_list('variants', ['64x2'], 'Mosaic block_k x K/V stages; '
                              'the first also runs the prefix-LM mask (--prefix)')
_PREFIX = flags.DEFINE_bool('prefix', True, 'forward: also time the first variant under a '
                            'prefix-LM mask (a bidirectional first quarter)')
_PERSISTENT = flags.DEFINE_bool('persistent', False, 'also time the persistent forward '
                                 '(mosaic_gpu.Config.persistent_ctas = the GPU\'s SM count) '
                                 'at 0% and 65%, end to end and kernel alone: keys '
                                 'ours_dense_persistent[_kernel], ours_s65_persistent[_kernel]; '
                                 'with --check, checked against the reference too')
_ITERS = flags.DEFINE_integer('iters', 20, 'calls per timed batch')
_ALTERNATE = flags.DEFINE_integer('alternate_rounds', 0, 'forward: also time the dense '
                                  'baselines and ours at 65% (persistent too, with '
                                  '--persistent) end to end in alternation, this many batches '
                                  'each (timing.time_alternating), so that the GPU\'s drift '
                                  'hits the ratio\'s two sides alike; keys `alternating` and '
                                  '`alternating_ratio` (to the fastest dense kernel of those)')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed batches (median)')
_CHECK = flags.DEFINE_bool('check', True, 'compare kernels with the reference first')
_BASELINES = flags.DEFINE_list('baselines', ['cudnn', 'tokamax'], 'dense kernels to time')
_MODES = flags.DEFINE_list('modes', ['fwd', 'fwdbwd', 'decode'], 'what to time')
_BWD_SEQS = flags.DEFINE_list('bwd_seqs', ['4096', '16384'], 'sequence lengths of fwd+bwd')
_COTANGENTS = flags.DEFINE_list('cotangents', ['constant'], 'how fwd+bwd gets its output '
                                'cotangent, each timed in turn: constant (jax.grad of '
                                'sum(out) * 1e-3: XLA broadcasts the constant into a '
                                'full-size cotangent each call) or random (jax.vjp applied '
                                'to a fixed random cotangent, as FlashAttention\'s '
                                'benchmarks and a layer inside a model get it)')
flags.register_validator('cotangents', lambda c: set(c) <= {'constant', 'random'},
                         '--cotangents: constant and/or random')
_BWD_CONFIGS = flags.DEFINE_list('bwd_configs', [], 'more Mosaic backward configs to time at '
                                 '65%: DQxDKV ring stages (the default is 2x2, dq fits up to 5 '
                                 'at block_k 64), then optionally xORDER (the dk/dv launch '
                                 'order, mosaic_gpu_backward.DKV_ORDERS); keys ours_s65_bwd<spec>')


def _parses(parse, specs):
  """Whether parse (e.g. bwd_config) takes every spec: a flag validator."""
  try:
    for spec in specs:
      parse(spec)
  except ValueError:
    return False
  return True


flags.register_validator('bwd_configs', lambda specs: _parses(bwd_config, specs),
                         '--bwd_configs: DQxDKV[xORDER] entries, each stage count '
                         '>= 2 (e.g. 4x2, 2x2xsink_first)')
_DECODE = flags.DEFINE_list('decode', ['1x8192', '8x8192', '1x32768', '8x32768'],
                            'decode batch x cache length')
_DECODE_FUSED = flags.DEFINE_list('decode_fused', [], 'more configs of the fused decode to '
                                  'time at 65%, SPLITSxSTAGES[xBLOCKS[xWARPS[xPREFETCH]]] '
                                  '(decode_config; e.g. 16x3, 4x3x2, 4x2x4x8x2): keys '
                                  'ours_fused_s65_<spec>')
_DECODE_TABLES = flags.DEFINE_list('decode_tables', [], 'the same for the table decode '
                                   '(decode.sparse_decode): keys ours_s65_<spec>')
_DECODE_MOSAIC = flags.DEFINE_list('decode_mosaic', ['0x1', '0x2'], 'the Mosaic decode kernel '
                                   '(mosaic_gpu_decode.sparse_decode), SPLITSxSTAGES at 65% '
                                   '(0 splits: its default); the first also with each other '
                                   'decode --select_method: keys ours_mosaic_s65_<spec>[_kernel'
                                   '|_<method>]')
# At batch 8 x 32k a chained 65% step took 4-6% less time with 128-key blocks
# than with 64 (the selection ranks 256 blocks instead of 512: 5.1 us against
# 8.4; the decode kernel the same 47; H200, docs/results.md).
_DECODE_BLOCK_K = flags.DEFINE_integer('decode_block_k', 128, 'key block of the decode '
                                       'selection and kernels (64 or 128): the decode '
                                       'tools\' tables, pooled keys and budget')
_DECODE_CHAIN = flags.DEFINE_integer('decode_chain', 0, 'also time N decode steps chained in '
                                     'one program (chained): per-step ms in chain_ms, for '
                                     'cuDNN and our 65% paths; 0: not')

BQ = mosaic_gpu.TILE_Q


def time_ms(fn, *args):
  return timing.time_ms(fn, *args, iters=_ITERS.value, repeats=_REPEATS.value)


def select_blocks(q, k, keep, visible, block_k, method='top_k', score_options=None,
                  dense_shortcut=True):
  """The timed selection stage: pooled block scores, a per-row budget, tables.

  Stands in for the gate's inference path (mean-pooled queries against
  max-pooled keys of each kv head; first and diagonal blocks forced) so that
  its cost is inside the timing; the learned projection adds one small matmul.
  `visible` is a static numpy [nQ, nK] array; `method` is tables_from_scores',
  or 'fused'; score_options: more keywords of the fused score_tables. A budget
  that keeps every visible tile (dense mode) takes the mask's tables, no scores
  (dense_shortcut=False: scores them all the same, for tests).
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  forced = budgets.forced_tiles(t, BQ, block_k)
  budget = budgets.row_budgets(keep, visible, forced)
  if dense_shortcut and (budget >= visible.sum(-1)).all():
    # Dense mode: every visible tile is kept whatever the scores say, so the
    # tables are the mask's, constants of the program (as a model that skips
    # its gate at full budget would build them): no selection runs.
    ids, count = budgets.mask_tables(visible)
    full = lambda x: jnp.asarray(np.broadcast_to(x, (b, hkv) + x.shape))
    return bt.BlockTables(full(ids), full(count), None, None)
  if method == 'fused':   # the whole stage in two kernels: key pooling, then the rest
    interpret = jax.default_backend() == 'cpu'
    kp = select_triton.pool_keys(k, block_k=block_k, interpret=interpret)
    rule = np.where(forced, select_triton.FORCED,
                    np.where(visible, select_triton.CANDIDATE, select_triton.HIDDEN))
    kv_ids, kv_count = select_triton.score_tables(
        q, kp, jnp.asarray(rule, jnp.int8), jnp.asarray(budget), int(budget.max()),
        block_q=BQ, interpret=interpret, padded=True, **(score_options or {}))
    return bt.BlockTables(kv_ids, kv_count, None, None)
  # q is the one big read here (64 MB at 16k tokens): one reduction over each
  # tile's rows, bf16 in and an f32 accumulator (the convert fuses into it; no
  # f32 copy of q), then a [B, nQ, Hq, D] sum over each group's heads. Written
  # as two sums so no backend has to split a reduction over the
  # non-adjacent (row, head) axes itself.
  rows = jnp.sum(q.reshape(b, t // BQ, BQ, hq, d), axis=2, dtype=jnp.float32)
  qp = rows.reshape(b, t // BQ, hkv, hq // hkv, d).sum(axis=3) / (BQ * (hq // hkv))
  qp = qp.astype(q.dtype)
  kp = k.reshape(b, -1, block_k, hkv, d).max(axis=2)
  scores = jnp.einsum('bqhd,bkhd->bhqk', qp, kp, preferred_element_type=jnp.float32)
  scores = jnp.where(forced, jnp.inf, jnp.where(visible, scores, -jnp.inf))
  kv_ids, kv_count = bt.tables_from_scores(
      scores, jnp.broadcast_to(budget, scores.shape[:-1]), int(budget.max()), method=method)
  return bt.BlockTables(kv_ids, kv_count, None, None)


def same_tables(a, b):
  """Whether two kv tables list the same blocks: equal counts, and equal ids
  over the narrower width (`fused` keeps a power-of-two width; entries past a
  count repeat its last id in both)."""
  width = min(a.kv_ids.shape[-1], b.kv_ids.shape[-1])
  return bool(np.array_equal(a.kv_count, b.kv_count)
              and np.array_equal(a.kv_ids[..., :width], b.kv_ids[..., :width]))


def forward_select_methods():
  """--select_method without the decode-only ones, in its order: the forward
  and forward+backward take the first and time the others beside it."""
  methods = [m for m in _SELECT_METHODS.value if m not in DECODE_ONLY]
  if not methods:
    raise ValueError(f'--select_method={",".join(_SELECT_METHODS.value)} names no forward '
                     f'method (decode only: {DECODE_ONLY})')
  return methods


def make_inputs(seq, seed=0):
  b = max(1, _TOKENS.value // seq)
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  shape_q = (b, seq, _HEADS.value, _HEAD_DIM.value)
  shape_kv = (b, seq, _KV_HEADS.value, _HEAD_DIM.value)
  q = jax.random.normal(keys[0], shape_q, jnp.bfloat16)
  k = jax.random.normal(keys[1], shape_kv, jnp.bfloat16)
  v = jax.random.normal(keys[2], shape_kv, jnp.bfloat16)
  return q, k, v


def bwd_config(spec):
  """mosaic_gpu_backward.Config of a DQxDKV[xORDER] spec, e.g. '4x2' or
  '2x2xsink_first'."""
  fields = spec.split('x')
  if not 2 <= len(fields) <= 3 or not all(f.isdigit() for f in fields[:2]):
    raise ValueError(f'--bwd_configs entry {spec!r} is not DQxDKV[xORDER] (e.g. 4x2)')
  return mosaic_gpu_backward.Config(*map(int, fields[:2]), *fields[2:])


def sm_count():
  """The GPU's SM count (as JAX's Pallas GPU ops read it): a persistent kernel's CTAs."""
  return jax.devices()[0].core_count


def sparse_fn(keep, seq, prefix, block_k, stages, impl='mosaic', method=None,
              backward=mosaic_gpu_backward.Config(), persistent_ctas=0, score_options=None):
  """jitted (q, k, v) -> (out, kv_count) with selection inside, and its parts.
  method: the tables' (default: the first of --select_method); backward: the
  Mosaic backward's Config (impl 'mosaic_vjp'); persistent_ctas: the forward's;
  score_options: select_blocks'."""
  visible = budgets.visible_tiles(seq, BQ, block_k, prefix)
  sizes = bt.BlockSizes(BQ, block_k)
  config = mosaic_gpu.Config(stages, backward, persistent_ctas)
  method = method or forward_select_methods()[0]
  select_fn = lambda q, k: select_blocks(q, k, keep, visible, block_k, method, score_options)
  select = jax.jit(select_fn)

  @jax.jit
  def kernel(q, k, v, tables):
    prefix_len = jnp.full((q.shape[0],), prefix, jnp.int32)
    if impl == 'triton':
      kv_len = jnp.full((q.shape[0],), seq, jnp.int32)
      return triton.sparse_attention(q, k, v, tables, kv_len, prefix_len, block_sizes=sizes)
    # Unpadded: the Mosaic kernels take the lengths as static (None), as a model's
    # unpadded batch does; a constant array would cost a broadcast kernel a call.
    kv_len, prefix_len = None, (None if prefix == 0 else prefix_len)
    if impl == 'mosaic_vjp':   # differentiable: the Mosaic forward and backward
      return mosaic_gpu.sparse_attention(q, k, v, tables, kv_len, prefix_len,
                                         block_sizes=sizes, config=config)
    return mosaic_gpu.sparse_attention_fwd(
        q, k, v, tables, kv_len, prefix_len, block_sizes=sizes, config=config)[0]

  @jax.jit
  def run(q, k, v):
    tables = select_fn(q, k)
    return kernel(q, k, v, tables), tables.kv_count
  return run, select, kernel


def dense_baselines():
  fns = {}
  if 'cudnn' in _BASELINES.value:
    fns['cudnn'] = jax.jit(functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation='cudnn'))
  if 'tokamax' in _BASELINES.value:
    try:
      import tokamax
      fns['tokamax_mosaic'] = jax.jit(functools.partial(
          tokamax.dot_product_attention, is_causal=True, implementation='mosaic'))
    except ImportError as e:
      print(f'tokamax not available: {e}')
  return fns


def check_kernels():
  """Mosaic vs the reference on small ragged shapes, gradients under the default
  backward Config and each of --bwd_configs; raises on a mismatch."""
  rows = []
  for seed, (b, t, hq, hkv, bk, kv_len, prefix, p) in enumerate([
      (2, 512, 4, 1, 64, [512, 300], [0, 129], 0.5),
      (1, 1024, 8, 1, 128, [1000], [1000], 1.0),
      (1, 768, 2, 2, 64, [768], [200], 0.3),
      (1, 256, 4, 4, 64, [256], [0], 0.0)]):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, t, hq, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, hkv, 128), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, hkv, 128), jnp.bfloat16)
    mask = jax.random.bernoulli(keys[3], p, (b, hkv, t // BQ, t // bk))
    tables = bt.build_block_tables(mask)
    sizes = bt.BlockSizes(BQ, bk)
    kv_len, prefix = jnp.array(kv_len), jnp.array(prefix)
    ref = reference.reference_sparse_attention(q, k, v, mask, kv_len, prefix, block_sizes=sizes)
    out, lse = mosaic_gpu.sparse_attention_fwd(q, k, v, tables, kv_len, prefix, block_sizes=sizes)
    ref32, out32 = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    err = rel_err(out32, ref32)
    rows.append(dict(case=seed, rel_err=err, nan=bool(np.isnan(out32).any())))
    print(f'check mosaic case {seed}: rel err {err:.2e}')
    if not err < 2e-2 or rows[-1]['nan']:
      raise SystemExit(f'mosaic kernel mismatch in case {seed}: rel err {err}')
    if _PERSISTENT.value:   # the same tiles in another order: the same bits
      config = mosaic_gpu.Config(persistent_ctas=sm_count())
      same = np.array_equal(out, mosaic_gpu.sparse_attention_fwd(
          q, k, v, tables, kv_len, prefix, block_sizes=sizes, config=config)[0])
      rows[-1]['persistent_same'] = bool(same)
      print(f'check mosaic case {seed}: persistent forward bit-identical: {same}')
      if not same:
        raise SystemExit(f'the persistent forward differs in case {seed}')
    # Gradients (the Mosaic custom_vjp) and the Triton forward.
    w = jax.random.normal(keys[0], q.shape, jnp.float32)
    def loss(fn):
      return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    ours = lambda bwd: loss(lambda q, k, v: mosaic_gpu.sparse_attention(
        q, k, v, tables, kv_len, prefix, block_sizes=sizes,
        config=mosaic_gpu.Config(backward=bwd)))
    configs = {'': mosaic_gpu_backward.Config()}
    configs.update({f'_{spec}': bwd_config(spec) for spec in _BWD_CONFIGS.value})
    theirs = loss(lambda q, k, v: reference.reference_sparse_attention(
        q, k, v, mask, kv_len, prefix, block_sizes=sizes))
    got = {}
    for name, bwd in configs.items():
      try:
        got[name] = jax.grad(ours(bwd), argnums=(0, 1, 2))(q, k, v)
      except Exception as e:  # one of --bwd_configs (e.g. too much shared memory)
        if not name:
          raise
        rows[-1][f'error{name}'] = f'{type(e).__name__}: {str(e)[-300:]}'
        print(f'check case {seed}: backward{name} failed: {rows[-1][f"error{name}"]}')
    want = jax.grad(theirs, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
    errs = {f'd{n}{name}': rel_err(g, r)
            for name, grads in got.items() for n, g, r in zip('qkv', grads, want)}
    try:
      tri = triton.sparse_attention(q, k, v, tables, kv_len, prefix, block_sizes=sizes)
      errs['triton_fwd'] = rel_err(tri, ref32)
    except Exception as e:  # the Triton kernels: reported, the check goes on
      rows[-1]['triton_error'] = f'{type(e).__name__}: {str(e)[-300:]}'
      print(f'check case {seed}: triton failed: {rows[-1]["triton_error"]}')
    rows[-1].update(errs)
    print(f'check case {seed}: ' + ', '.join(f'{n} {e:.2e}' for n, e in errs.items()))
    if not all(e < 3e-2 for e in errs.values()):
      raise SystemExit(f'gradient or triton mismatch in case {seed}: {errs}')
  return rows


def alternate(res, dense, ours, q, k, v):
  """res['alternating'][name] = ms of the dense and our paths timed in alternation,
  and res['alternating_ratio'] each over the fastest dense one."""
  ms = timing.time_alternating(dense | ours, q, k, v, rounds=_ALTERNATE.value,
                               iters=_ITERS.value)
  best = min(ms[n] for n in dense)
  res['alternating'] = ms
  res['alternating_ratio'] = {n: t / best for n, t in ms.items()}


def bench_seq(seq, prefix, variant, baselines):
  """One row: dense baselines (causal only), our kernel dense and sparse.
  The usual keys select with the first --select_method (`select_method`); at
  65% each other method adds `ours_s65_<m>` (end to end) and
  `ours_s65_select_<m>`, and `select_agree[m]` says its tables are the same."""
  block_k, stages = variant
  q, k, v = make_inputs(seq)
  b = q.shape[0]
  res = dict(seq=seq, batch=b, prefix=prefix, block_k=block_k, stages=stages, ms={}, tflops={},
             sparsity={}, select_method=forward_select_methods()[0], select_agree={})
  if prefix == 0:
    for name, fn in baselines.items():
      try:
        res['ms'][name] = time_ms(fn, q, k, v)
      except Exception as e:  # a baseline that fails is reported, not fatal
        print(f'{name} failed at {seq}: {type(e).__name__}: {str(e)[:300]}')
  visible = budgets.visible_tiles(seq, BQ, block_k, prefix)
  for sparsity in [0.0] + [float(s) for s in _SPARSITIES.value]:
    name = 'ours_dense' if sparsity == 0 else f'ours_s{round(100 * sparsity)}'
    run, select, kernel = sparse_fn(1.0 - sparsity, seq, prefix, block_k, stages)
    res['ms'][name] = time_ms(run, q, k, v)
    counts = jax.device_get(run(q, k, v)[1])
    computed = int(counts.sum()) * (_HEADS.value // _KV_HEADS.value)
    res['sparsity'][name] = budgets.sparsity(counts, visible)
    res['tflops'][name] = 4 * BQ * block_k * _HEAD_DIM.value * computed / res['ms'][name] / 1e9
    if sparsity in (0.0, 0.65):   # where the time goes: kernel alone, selection alone
      tables = select(q, k)
      res['ms'][name + '_kernel'] = time_ms(kernel, q, k, v, tables)
      res['ms'][name + '_select'] = time_ms(select, q, k)
      res['tflops'][name + '_kernel'] = (res['tflops'][name] * res['ms'][name]
                                         / res['ms'][name + '_kernel'])
    if _PERSISTENT.value and sparsity in (0.0, 0.65):
      run_p, _, kernel_p = sparse_fn(1.0 - sparsity, seq, prefix, block_k, stages,
                                     persistent_ctas=sm_count())
      res['ms'][name + '_persistent'] = time_ms(run_p, q, k, v)
      res['ms'][name + '_persistent_kernel'] = time_ms(kernel_p, q, k, v, tables)
      res.setdefault('persistent_same', {})[name] = bool(np.array_equal(
          kernel(q, k, v, tables), kernel_p(q, k, v, tables)))
    if _ALTERNATE.value and sparsity == 0.65 and prefix == 0:
      ours = {name: run} | ({name + '_persistent': run_p} if _PERSISTENT.value else {})
      alternate(res, {n: baselines[n] for n in res['ms'] if n in baselines}, ours, q, k, v)
    if sparsity == 0.65:   # the other selection methods, in the same run
      for method in forward_select_methods()[1:]:
        run_m, select_m, _ = sparse_fn(1.0 - sparsity, seq, prefix, block_k, stages,
                                       method=method)
        try:
          res['ms'][f'{name}_{method}'] = time_ms(run_m, q, k, v)
          res['ms'][f'{name}_select_{method}'] = time_ms(select_m, q, k)
          got = select_m(q, k)
        except Exception as e:  # e.g. a kernel that does not lower: reported
          res.setdefault('errors', {})[f'select_{method}'] = f'{type(e).__name__}: {str(e)[-300:]}'
          print(f'select_method {method} failed at {seq}: {res["errors"][f"select_{method}"]}')
          continue
        res['select_agree'][method] = same_tables(got, tables)
        if not res['select_agree'][method]:
          print(f'select_method {method} tables differ from '
                f'{forward_select_methods()[0]} at {seq}, prefix {prefix}, block_k {block_k}')
  if block_k == 64 and prefix == 0:   # the portable Triton kernel, same tables
    try:
      run = sparse_fn(0.35, seq, prefix, block_k, stages, impl='triton')[0]
      res['ms']['triton_s65'] = time_ms(run, q, k, v)
    except Exception as e:
      print(f'triton failed at {seq}: {type(e).__name__}: {str(e)[-300:]}')
  dense = [res['ms'][n] for n in baselines if res['ms'].get(n)]
  res['best_dense_ms'] = min(dense) if dense else res['ms']['ours_dense']
  print(json.dumps(res))
  return res


def _output(fn):
  def out(q, k, v):
    out = fn(q, k, v)
    return out[0] if isinstance(out, tuple) else out
  return out


def random_cotangent(q):
  """The fixed random output cotangent of --cotangents random (and of the
  tools that time a step the same way)."""
  return jax.random.normal(jax.random.PRNGKey(7), q.shape, q.dtype)


def grad_fn(fn, cotangent='constant'):
  """jitted (q, k, v, d_out) -> (dq, dk, dv) of fn's output. constant: the
  gradient of sum(out) * 1e-3, d_out unused; random: the vjp of d_out."""
  if cotangent == 'random':
    def grads(q, k, v, d_out):
      return jax.vjp(_output(fn), q, k, v)[1](d_out)
    return jax.jit(grads)

  def loss(q, k, v):
    return jnp.sum(_output(fn)(q, k, v).astype(jnp.float32) * 1e-3)
  return jax.jit(lambda q, k, v, d_out: jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


def bench_fwdbwd(seq, block_k, baselines, cotangent='constant'):
  """Forward + backward: our Mosaic forward and backward (custom_vjp), against
  the dense kernels' own backward (selection inside, as in the forward)."""
  q, k, v = make_inputs(seq)
  d_out = random_cotangent(q)
  res = dict(seq=seq, block_k=block_k, cotangent=cotangent, ms={})
  for name, fn in baselines.items():
    try:
      res['ms'][name] = time_ms(grad_fn(fn, cotangent), q, k, v, d_out)
    except Exception as e:
      print(f'{name} fwd+bwd failed at {seq}: {type(e).__name__}: {str(e)[:300]}')
  runs = [('ours_dense', 0.0, '2x2', 0), ('ours_s65', 0.65, '2x2', 0)]
  runs += [(f'ours_s65_bwd{spec}', 0.65, spec, 0) for spec in _BWD_CONFIGS.value]
  if _PERSISTENT.value:
    runs.append(('ours_s65_persistent', 0.65, '2x2', sm_count()))
  for name, sparsity, spec, ctas in runs:
    try:
      run = sparse_fn(1.0 - sparsity, seq, 0, block_k, 2, impl='mosaic_vjp',
                      backward=bwd_config(spec), persistent_ctas=ctas)[0]
      res['ms'][name] = time_ms(grad_fn(run, cotangent), q, k, v, d_out)
    except Exception as e:   # e.g. a ring that overflows shared memory: reported
      res.setdefault('errors', {})[name] = f'{type(e).__name__}: {str(e)[-300:]}'
      print(f'{name} fwd+bwd failed at {seq}: {res["errors"][name]}')
  dense = [res['ms'][n] for n in baselines if res['ms'].get(n)]
  res['best_dense_ms'] = min(dense) if dense else res['ms'].get('ours_dense')
  print(json.dumps(res))
  return res


def rel_err(out, ref):
  """||out - ref|| / ||ref|| in f32 (an all-zero ref: the absolute error / 1e-6)."""
  ref32, out32 = np.asarray(ref, np.float32), np.asarray(out, np.float32)
  return float(np.linalg.norm(out32 - ref32) / max(np.linalg.norm(ref32), 1e-6))


def decode_scores(q, pooled):
  """Block scores [B, Hkv, nK] f32 of one decode step: each GQA group's mean
  query (over its heads and new tokens) against the max-pooled keys, in f32
  throughout. (A bf16 mean is rounded where XLA materializes it and not where
  it fuses it, under its excess-precision default: a near-cutoff block then
  flipped between a jitted step and this function called alone.)"""
  b, m, hq, d = q.shape
  hkv = pooled.shape[2]
  qp = q.astype(jnp.float32).reshape(b, m, hkv, hq // hkv, d).mean(axis=(1, 3))
  return jnp.einsum('bhd,bkhd->bhk', qp, pooled.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def fused_decode_step(q, k, v, pooled, kv_len, prefix_len, q_offset, *, budget, block_k,
                      interpret=False, **config):
  """One decode step with the selection fused into the kernel: the scores, then
  the kernel keeps the `budget` best blocks besides the first and the new
  tokens' itself (no top-k, sort or tables). config: num_splits, num_stages."""
  scores = decode_scores(q, pooled)
  cutoff = jnp.full(scores.shape[:-1], budget, jnp.int32)
  return decode.sparse_decode_scored(q, k, v, scores, cutoff, kv_len, prefix_len, q_offset,
                                     block_k=block_k, rule='top_k', interpret=interpret,
                                     **config)


def head_major_decode_args(q, k, v, pooled, kv_len, prefix_len, q_offset, *, hkv):
  """fused_decode_step's arguments with each kv head as its own batch row:
  q [B*Hkv, M, G, D], caches and pooled keys [B*Hkv, S, 1, D]."""
  b, m, hq, d = q.shape
  rows = lambda x: x.transpose(0, 2, 1, 3).reshape(b * hkv, x.shape[1], 1, d)
  q = q.reshape(b, m, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, m, -1, d)
  each = lambda x: jnp.repeat(x, hkv)
  return q, rows(k), rows(v), rows(pooled), each(kv_len), each(prefix_len), each(q_offset)


def decode_config(spec):
  """Decode kernel options of a spec SPLITSxSTAGES[xBLOCKS[xWARPS[xPREFETCH]]]:
  num_splits (0: the kernel's default), num_stages, blocks_per_step, num_warps
  (0: the default), prefetch (absent: the kernel's default)."""
  names = ('num_splits', 'num_stages', 'blocks_per_step', 'num_warps', 'prefetch')
  fields = [int(f) for f in spec.split('x')]
  if not 2 <= len(fields) <= len(names):
    raise ValueError(f'decode spec {spec!r} is not '
                     'SPLITSxSTAGES[xBLOCKS[xWARPS[xPREFETCH]]]')
  config = dict(zip(names, fields))
  if not config.get('num_warps'):
    config.pop('num_warps', None)
  return config


def mosaic_decode_kernel(spec, block_k):
  """jitted (q, k, v, ids, count, kv_len, prefix_len, q_offset) ->
  mosaic_gpu_decode.sparse_decode at SPLITSxSTAGES."""
  config = decode_config(spec)
  return jax.jit(lambda q, k, v, ids, count, *lens: mosaic_gpu_decode.sparse_decode(
      q, k, v, ids, count, *lens, block_k=block_k, **config))


def decode_inputs(batch, cache, new=1):
  """Random q [B, new, Hq, D] and a full K/V cache [B, S, Hkv, D] (bf16), and
  the lengths (kv_len, prefix_len, q_offset) as arrays: arguments of every timed
  step, as in a model's decode step (closed over, XLA would rebuild each as a
  broadcast kernel in every call)."""
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  hq, hkv, d = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  q = jax.random.normal(keys[0], (batch, new, hq, d), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (batch, cache, hkv, d), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (batch, cache, hkv, d), jnp.bfloat16)
  kv_len = jnp.full((batch,), cache, jnp.int32)
  return q, kc, vc, (kv_len, jnp.zeros_like(kv_len), kv_len - new)


def pool_keys(kc, block_k):
  """Max-pooled keys [B, S / block_k, Hkv, D]: they live beside the cache
  (updated once per filled block, 1/block_k of a step's cost), so a step does
  not re-read every key to select."""
  b, s, hkv, d = kc.shape
  return kc.reshape(b, s // block_k, block_k, hkv, d).max(axis=2)


def decode_budget(sparsity, n_k):
  """Key blocks a row keeps at this block sparsity, the 2 forced ones included."""
  return max(2, int(np.ceil((1 - sparsity) * n_k)))


def decode_shapes():
  """--decode as [(batch, cache)]: the decode shapes every decode tool runs."""
  return [tuple(map(int, spec.split('x'))) for spec in _DECODE.value]


def decode_case(batch, cache, block_k=None, sparsity=0.65):
  """The decode tools' case (decode_ab, profile_decode, cta_spread,
  decode_timeline): a timed step's arguments (q, the k and v caches, the
  pooled keys, kv_len, prefix_len, q_offset; decode_inputs), the blocks a row
  keeps at `sparsity`, and the step's selection method (decode_select_methods'
  first)."""
  block_k = block_k or _DECODE_BLOCK_K.value
  q, kc, vc, lens = decode_inputs(batch, cache)
  pooled = jax.jit(pool_keys, static_argnums=1)(kc, block_k)
  return ((q, kc, vc, pooled, *lens), decode_budget(sparsity, cache // block_k),
          decode_select_methods()[0])


def mosaic_decode_step(budget, method, block_k=None, kernel=mosaic_gpu_decode,
                       select_options=None, **options):
  """jitted (q, k, v, pooled, kv_len, prefix_len, q_offset) -> out: a decode
  step keeping `budget` blocks a row, decode_tables by `method` (and
  select_options), then `kernel`'s sparse_decode (mosaic_gpu_decode, or a
  version of its file) with `options`; on a CPU in the GPU interpreter (a
  smoke run)."""
  interpret = jax.default_backend() == 'cpu'
  block_k = block_k or _DECODE_BLOCK_K.value

  def step(q, k, v, pooled, *lens):
    ids, count = decode_tables(q, pooled, budget, method, **(select_options or {}))
    return kernel.sparse_decode(q, k, v, ids, count, *lens, block_k=block_k,
                                interpret=interpret, **options)
  return jax.jit(step)


def decode_select_methods():
  """--select_method in a decode step's order: `ranked` first, then the
  tables_from_scores methods, then `fused` (the step takes the first, the
  others are timed beside it). At batch 8, cache 32k on an H200 `ranked` took
  10 us under Nsight Compute, the three kernels of XLA's scores and `pallas`
  tables 16-17.5, `fused`'s one kernel 17.7 (32 programs at 255 registers);
  chained, `ranked`'s step 0.0622 ms against `pallas`' 0.0655 in one
  alternating run (docs/results.md)."""
  order = {'ranked': 0, 'fused': 2}   # a stable sort: table methods keep their order
  return sorted(_SELECT_METHODS.value, key=lambda m: order.get(m, 1))


@jax.jit
def cudnn_decode(q, k, v, kv_len):
  """cuDNN's dense decode: q [B, M, Hq, D] against the cache's first kv_len keys."""
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_len,
                                      implementation='cudnn')


# cudnn_decode as a step of decode_case's arguments (the pooled keys unused).
cudnn_decode_step = jax.jit(lambda q, k, v, pooled, kv_len, *_: cudnn_decode(q, k, v, kv_len))


def decode_tables(q, pooled, budget, method='top_k', **ranked_options):
  """The timed selection of a decode step: the group's mean query against the
  pooled keys, the first and last blocks forced, `budget` blocks a row.
  method: a tables_from_scores method on XLA's scores (an einsum and the
  forcing, two kernels, then the tables), `fused`: all of it in one kernel
  (select_triton.score_tables, one program a (batch, kv head), the new tokens
  as its query tile), or `ranked`: all of it in one kernel of several programs
  a row, ids in rank order (select_triton.decode_ranked_tables, with
  ranked_options: its chunk, num_warps). The same blocks up to the scores'
  summation order."""
  n_k = pooled.shape[1]
  first_or_last = (np.arange(n_k) == 0) | (np.arange(n_k) == n_k - 1)
  rule = np.where(first_or_last, select_triton.FORCED, select_triton.CANDIDATE).astype(np.int8)
  if method == 'ranked':
    return select_triton.decode_ranked_tables(q, pooled, jnp.asarray(rule), budget, budget,
                                              interpret=jax.default_backend() == 'cpu',
                                              **ranked_options)
  if method == 'fused':
    b, m = q.shape[:2]
    ids, count = select_triton.score_tables(
        q, pooled, jnp.asarray(rule[None]), jnp.full((1,), budget, jnp.int32), budget,
        block_q=m, rows_per_load=m, padded=True, interpret=jax.default_backend() == 'cpu')
    return ids.reshape(b, pooled.shape[2], -1), count.reshape(b, -1)
  scores = decode_scores(q, pooled)
  # One budget for every row, a scalar (no broadcast kernel); the kernels read
  # a table row up to its count, so a padded width saves the slice.
  return bt.tables_from_scores(jnp.where(first_or_last, jnp.inf, scores), jnp.int32(budget),
                               budget, method=method, padded=True)


def bench_decode(batch, cache, block_k=None, new=1):
  """One decode step (new tokens of each GQA group) against a full cache:
  `ours_s*` select through top-k and tables, `ours_fused_s*` inside the kernel
  (the same number of blocks: block 0, the last one, and the best others).
  `_kernel`: the kernel alone (tables / scores made outside the timing; its
  split merge inside). tbps: the K/V bytes a key reads (all of the cache, or
  the 35% of it at s65) over its time, TB/s. Inputs and lengths: decode_inputs."""
  hq, hkv, d = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  block_k = block_k or _DECODE_BLOCK_K.value
  q, kc, vc, lens = decode_inputs(batch, cache, new)
  kv_len = lens[0]
  n_k = cache // block_k
  res = dict(batch=batch, cache=cache, block_k=block_k, ms={})
  dense = cudnn_decode
  res['ms']['cudnn'] = time_ms(dense, q, kc, vc, kv_len)
  res['ms']['xla'] = time_ms(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation='xla')), q, kc, vc)

  pooled = jax.jit(pool_keys, static_argnums=1)(kc, block_k)
  methods = decode_select_methods()
  res['select'] = methods[0]

  def select(budget, method=methods[0]):
    return jax.jit(functools.partial(decode_tables, budget=budget, method=method))

  def table_kernel(**config):
    return jax.jit(lambda q, k, v, ids, count, *lens: decode.sparse_decode(
        q, k, v, ids, count, *lens, block_k=block_k, **config))

  def sparse(budget, method=methods[0], **config):
    tables, kernel = select(budget, method), table_kernel(**config)
    return jax.jit(lambda q, k, v, kp, *lens: kernel(q, k, v, *tables(q, kp), *lens))

  budget = lambda sparsity: decode_budget(sparsity, n_k)

  def fused(sparsity, **config):
    return jax.jit(functools.partial(fused_decode_step, budget=budget(sparsity) - 2,
                                     block_k=block_k, **config))

  def fused_kernel(**config):
    return jax.jit(lambda q, k, v, scores, cutoff, *lens: decode.sparse_decode_scored(
        q, k, v, scores, cutoff, *lens, block_k=block_k, rule='top_k', **config))
  step_args = (q, kc, vc, pooled, *lens)   # the table and fused steps take the same
  steps = {}
  for sparsity in (0.0, 0.65):
    name = f's{round(100 * sparsity)}'
    steps[name] = sparse(budget(sparsity)), fused(sparsity)
    res['ms'][f'ours_{name}'] = time_ms(steps[name][0], *step_args)
    res['ms'][f'ours_fused_{name}'] = time_ms(steps[name][1], *step_args)
  def timed(key, fn, *args):
    try:
      res['ms'][key] = time_ms(fn, *args)
    except Exception as e:  # a config that does not compile (shared memory): reported
      res.setdefault('errors', {})[key] = f'{type(e).__name__}: {str(e)[-300:]}'
      print(f'{key} failed at {batch}x{cache}: {res["errors"][key]}')

  for method in methods[1:]:   # the same tables, another way to build them
    timed(f'ours_s65_{method}', sparse(budget(0.65), method), *step_args)
  # The kernels alone at 65%, then each requested config, step and kernel alone.
  tables = select(budget(0.65))(q, pooled)
  scores = decode_scores(q, pooled)
  cutoff = jnp.full(scores.shape[:-1], budget(0.65) - 2, jnp.int32)
  for suffix, config in [('', {})] + [(f'_{spec}', decode_config(spec))
                                      for spec in _DECODE_TABLES.value]:
    if suffix:
      timed(f'ours_s65{suffix}', sparse(budget(0.65), **config), *step_args)
    timed(f'ours_s65{suffix}_kernel', table_kernel(**config), q, kc, vc, *tables, *lens)
  for suffix, config in [('', {})] + [(f'_{spec}', decode_config(spec))
                                      for spec in _DECODE_FUSED.value]:
    if suffix:
      timed(f'ours_fused_s65{suffix}', fused(0.65, **config), *step_args)
    timed(f'ours_fused_s65{suffix}_kernel', fused_kernel(**config),
          q, kc, vc, scores, cutoff, *lens)
  # Both read the same blocks (ties go to the lower index in both), so they agree.
  tables_step, fused_step = steps['s65']
  tables_out = tables_step(*step_args)
  res['fused_vs_tables_rel_err'] = rel_err(fused_step(*step_args), tables_out)
  chain = {'cudnn': lambda q, k, v, kp, kv_len, *_: dense(q, k, v, kv_len),
           'ours_s65': tables_step, 'ours_fused_s65': fused_step}
  for spec in _DECODE_MOSAIC.value:   # the same tables, streamed by TMA (one new token)
    kernel = mosaic_decode_kernel(spec, block_k)
    # The first spec also with each other way to build the tables.
    for method in methods[:1] + (methods[1:] if spec == _DECODE_MOSAIC.value[0] else []):
      key = f'ours_mosaic_s65_{spec}' + ('' if method == methods[0] else f'_{method}')
      selection = select(budget(0.65), method)
      step = jax.jit(lambda q, k, v, kp, *lens, kernel=kernel, selection=selection:
                     kernel(q, k, v, *selection(q, kp), *lens))
      chain[key] = step
      timed(key, step, *step_args)
      if key in res['ms']:
        res.setdefault('mosaic_vs_tables_rel_err', {})[key] = rel_err(
            step(*step_args), tables_out)
    timed(f'ours_mosaic_s65_{spec}_kernel', kernel, q, kc, vc, *tables, *lens)
  # The same step over a head-major cache: each kv head's blocks contiguous in
  # memory (rows of D instead of a stride of Hkv * D), as kv-head batch rows.
  head_major = head_major_decode_args(*step_args, hkv=hkv)
  res['ms']['ours_fused_s65_headmajor'] = time_ms(fused(0.65), *head_major)
  out_hm = fused_step(*head_major).reshape(batch, hkv, new, hq // hkv, d)
  res['headmajor_vs_tables_rel_err'] = rel_err(
      out_hm.transpose(0, 2, 1, 3, 4).reshape(batch, new, hq, d), tables_out)
  if _DECODE_CHAIN.value:
    n = res['chain'] = _DECODE_CHAIN.value
    for name, step in chain.items():
      try:
        res.setdefault('chain_ms', {})[name] = time_ms(chained(step, n), *step_args) / n
      except Exception as e:  # a Mosaic config that does not compile: reported
        res.setdefault('errors', {})[f'{name}_chain'] = f'{type(e).__name__}: {str(e)[-300:]}'
  res['best_dense_ms'] = min(res['ms']['cudnn'], res['ms']['xla'])
  cache_bytes = 2 * kc.size * kc.dtype.itemsize
  read = lambda n: cache_bytes * (budget(0.65) / n_k if 's65' in n else 1.0)
  res['tbps'] = {n: read(n) / ms / 1e9 for n, ms in res['ms'].items()}
  print(json.dumps(res))
  return res


def write_report(stem, rows, table, **env):
  """--out/stem.json (the run's device, jax version, date, `env` and the rows)
  and --out/stem.md (table(rows, env)), and prints the table: the benchmark
  tools' common ending."""
  env = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=time.strftime('%Y-%m-%d'), **env)
  os.makedirs(FLAGS.value, exist_ok=True)
  with open(os.path.join(FLAGS.value, f'{stem}.json'), 'w') as f:
    json.dump(dict(env=env, rows=rows), f, indent=1)
  text = table(rows, env)
  with open(os.path.join(FLAGS.value, f'{stem}.md'), 'w') as f:
    f.write(text)
  print(text)


def chained(step, n):
  """n calls of a decode step in one jitted program, each one's output the next
  one's query, as a model's layers follow each other within one decode step.
  Its time / n is a step's device time with one dispatch shared by n; a step
  timed alone also pays the dispatch and its kernels' launch latency (~16-20 us
  a call on the H200, cuDNN's too; docs/results.md)."""
  def run(q, *rest):
    for _ in range(n):
      q = step(q, *rest).astype(q.dtype)
    return q
  return jax.jit(run)


def check_decode():
  """The Triton decode kernels (block tables; scores with either cutoff rule)
  vs their references on the GPU; ragged lengths, a prefix, 4 new tokens. Each
  runs at its default loop, at 2 and 4 blocks a step with every prefetch
  depth (4 with 2 stages: 3 would need ~270 KB of shared memory), and at each
  config of --decode_tables / --decode_fused; then the Mosaic decode (one new
  token) at each config of --decode_mosaic. A config of those flags that fails
  to compile is reported (its timing fails the same way); a mismatch stops
  the run."""
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(keys[0], (2, 4, 16, 128), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (2, 4096, 4, 128), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (2, 4096, 4, 128), jnp.bfloat16)
  scores = jax.random.normal(keys[3], (2, 4, 64))
  budgets = jnp.array([[20, 5, 64, 1], [3, 30, 7, 64]])
  lens = (jnp.array([4000, 2500]), jnp.array([100, 0]), jnp.array([3996, 2496]))
  ids, count = bt.tables_from_scores(scores, budgets, 64)
  loops = [('default', {})] + [
      (f'n{n}p{p}', dict(blocks_per_step=n, prefetch=p, num_stages=2) if n == 4
       else dict(blocks_per_step=n, prefetch=p))
      for n in (2, 4) for p in decode.PREFETCH]
  specs = lambda flag: [(spec, decode_config(spec)) for spec in flag.value]
  one = (q[:, :1], kc, vc, ids, count, *lens)   # the Mosaic decode takes one new token
  # case: (kernel, reference, args, kwargs, loops that must run, configs whose
  # compile failure is reported rather than fatal)
  cases = {
      'decode': (decode.sparse_decode, decode.sparse_decode_reference,
                 (q, kc, vc, ids, count, *lens), {}, loops, specs(_DECODE_TABLES)),
      'decode_scored_top_k': (decode.sparse_decode_scored,
                              decode.sparse_decode_scored_reference,
                              (q, kc, vc, scores, budgets, *lens), dict(rule='top_k'),
                              loops, specs(_DECODE_FUSED)),
      'decode_scored_keep_min': (decode.sparse_decode_scored,
                                 decode.sparse_decode_scored_reference,
                                 (q, kc, vc, scores, jnp.full((2, 4), 0.5), *lens),
                                 dict(rule='keep_min'), loops, specs(_DECODE_FUSED)),
      # A config that does not compile (shared memory) is reported.
      'decode_mosaic': (mosaic_gpu_decode.sparse_decode, decode.sparse_decode_reference, one,
                        {}, [], specs(_DECODE_MOSAIC)),
  }
  rows = []
  for case, (kernel, reference_fn, args, kw, required, optional) in cases.items():
    want = reference_fn(*args, block_k=64, **kw)
    for loop, config in required + optional:
      try:
        out = np.asarray(kernel(*args, block_k=64, **kw, **config), np.float32)
      except Exception as e:
        if (loop, config) in required:
          raise
        print(f'check {case} {loop}: failed: {type(e).__name__}: {str(e)[-300:]}')
        rows.append(dict(case=case, loop=loop, error=f'{type(e).__name__}'))
        continue
      err = rel_err(out, want)
      print(f'check {case} {loop}: rel err {err:.2e}')
      if not err < 2e-2:
        raise SystemExit(f'{case} {loop} mismatch: rel err {err}')
      rows.append(dict(case=case, loop=loop, rel_err=err))
  return rows


def forward_markdown(results):
  names = sorted({n for r in results for n in r['ms']})
  lines = ['', f'Forward, batch x seq = {_TOKENS.value}; tables {BQ} x block_k. '
           'ms (median), and the ratio to the fastest dense kernel of the run (causal rows: '
           'cuDNN / tokamax; prefix rows: our own dense mode). `_kernel` = tables built '
           'outside the timing, `_select` = selection and tables alone. Tables by '
           f'`{forward_select_methods()[0]}` (--select_method) unless a key ends in another '
           'method (`ours_s65_rank`, `ours_s65_select_rank`: the same tables, built without '
           'a sort). Budgets: benchmarks/budgets.py, the named sparsity exactly (`sparsity` in '
           'the JSON).'
           + ''.join(f" Tables DIFFER for {m} at seq {r['seq']}, prefix {r['prefix']}."
                     for r in results for m, ok in r.get('select_agree', {}).items()
                     if not ok), '',
           '| seq | prefix | block_k, stages | ' + ' | '.join(names) + ' |',
           '| --- | --- | --- | ' + ' | '.join('---' for _ in names) + ' |']
  for r in results:
    cells = []
    for n in names:
      ms = r['ms'].get(n)
      cells.append('' if ms is None else f"{ms:.3f} ({ms / r['best_dense_ms']:.2f}x)")
    lines.append(f"| {r['seq']} | {r['prefix']} | {r['block_k']}, {r['stages']} | "
                 + ' | '.join(cells) + ' |')
  alt = [r for r in results if 'alternating' in r]
  if alt:
    names = sorted({n for r in alt for n in r['alternating']})
    lines += ['', f'Timed in alternation ({_ALTERNATE.value} batches each, median; ms and the '
              'ratio to the fastest dense kernel of these):', '',
              '| seq | block_k | ' + ' | '.join(names) + ' |',
              '| --- | --- | ' + ' | '.join('---' for _ in names) + ' |']
    for r in alt:
      lines.append(f"| {r['seq']} | {r['block_k']} | " + ' | '.join(
          f"{r['alternating'][n]:.3f} ({r['alternating_ratio'][n]:.3f}x)"
          if n in r['alternating'] else '' for n in names) + ' |')
  tnames = sorted({n for r in results for n in r['tflops']})
  lines += ['', 'Throughput on the computed tiles (TFLOP/s):', '',
            '| seq | prefix | block_k, stages | ' + ' | '.join(tnames) + ' |',
            '| --- | --- | --- | ' + ' | '.join('---' for _ in tnames) + ' |']
  for r in results:
    lines.append(f"| {r['seq']} | {r['prefix']} | {r['block_k']}, {r['stages']} | " +
                 ' | '.join(f"{r['tflops'][n]:.0f}" if n in r['tflops'] else ''
                            for n in tnames) + ' |')
  return lines


def markdown(results, fwdbwd, decodes, env):
  lines = [f"# Block-sparse attention ({env['device']}, jax {env['jax']}, {env['date']})", '',
           f"{_HEADS.value} query heads, {_KV_HEADS.value} kv heads, head dim "
           f"{_HEAD_DIM.value}, bf16."]
  if results:
    lines += forward_markdown(results)
  if fwdbwd:
    cols = sorted({n for r in fwdbwd for n in r['ms']})
    lines += ['', 'Forward + backward (ms, ratio to the fastest dense kernel); cotangent: '
              'see --cotangents:', '',
              '| seq | block_k | cotangent | ' + ' | '.join(cols) + ' |',
              '| --- | --- | --- | ' + ' | '.join('---' for _ in cols) + ' |']
    for r in fwdbwd:
      cells = [f"{r['ms'][c]:.3f} ({r['ms'][c] / r['best_dense_ms']:.3f}x)"
               if r['ms'].get(c) else '' for c in cols]
      lines.append(f"| {r['seq']} | {r['block_k']} | {r.get('cotangent', 'constant')} | "
                   + ' | '.join(cells) + ' |')
  if decodes:   # a row per timing, a column per shape: the configs outnumber shapes
    lines += ['', 'Decode, one new token per sequence: ms (median), ratio to the '
              'fastest dense kernel, TB/s of K/V read (all of the cache; 35% of it '
              'for s65). `_kernel`: the kernel alone, selection outside the timing; '
              'configs SPLITSxSTAGES[xBLOCKS[xWARPS[xPREFETCH]]]. Tables by '
              f"`{decodes[0].get('select', 'top_k')}` unless a key ends in another method.", '',
              '| batch x cache | ' + ' | '.join(f"{r['batch']} x {r['cache']}"
                                               for r in decodes) + ' |',
              '| --- |' + ' --- |' * len(decodes)]
    for n in sorted({n for r in decodes for n in r['ms']}):
      cells = [f"{r['ms'][n]:.3f} ({r['ms'][n] / r['best_dense_ms']:.2f}x, "
               f"{r['tbps'][n]:.2f})" if r['ms'].get(n) else '' for r in decodes]
      lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
    chains = [r for r in decodes if r.get('chain_ms')]
    if chains:
      lines += ['', f"Decode, {chains[0]['chain']} steps chained in one program "
                '(`chained`): ms a step, speed-up over cuDNN chained the same way.', '',
                '| batch x cache | path | ms a step | vs cuDNN |', '| --- | --- | --- | --- |']
      for r in chains:
        dense = r['chain_ms'].get('cudnn')
        for n, ms in sorted(r['chain_ms'].items()):
          ratio = f'{dense / ms:.2f}x' if dense else ''
          lines.append(f"| {r['batch']} x {r['cache']} | {n} | {ms:.4f} | {ratio} |")
  return '\n'.join(lines) + '\n'


def main(_):
  os.makedirs(FLAGS.value, exist_ok=True)
  env = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             python=platform.python_version(), date=time.strftime('%Y-%m-%d'))
  print(env)
  checks = check_kernels() if _CHECK.value else []
  if _CHECK.value and 'decode' in _MODES.value:
    checks += check_decode()
  baselines = dense_baselines()
  results, fwdbwd, decodes = [], [], []
  variants = [tuple(map(int, v.split('x'))) for v in _VARIANTS.value]

  def save():
    with open(os.path.join(FLAGS.value, 'attention.json'), 'w') as f:
      json.dump(dict(env=env, checks=checks, forward=results, fwdbwd=fwdbwd,
                     decode=decodes), f, indent=1)
  for seq in map(int, _SEQS.value) if 'fwd' in _MODES.value else ():
    for i, variant in enumerate(variants):
      for prefix in (0, seq // 4) if i == 0 and _PREFIX.value else (0,):
        results.append(bench_seq(seq, prefix, variant, baselines))
      save()
  for seq in map(int, _BWD_SEQS.value) if 'fwdbwd' in _MODES.value else ():
    for cotangent in _COTANGENTS.value:
      fwdbwd.append(bench_fwdbwd(seq, variants[0][0], baselines, cotangent))
      save()
  for shape in decode_shapes() if 'decode' in _MODES.value else ():
    decodes.append(bench_decode(*shape))
    save()
  table = markdown(results, fwdbwd, decodes, env)
  with open(os.path.join(FLAGS.value, 'attention.md'), 'w') as f:
    f.write(table)
  print(table)


if __name__ == '__main__':
  app.run(main)
