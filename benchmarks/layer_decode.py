"""One attention layer of the model as a decode step runs it: the learned gate's
sparse path against the same layer decoding densely.

  python benchmarks/layer_decode.py --decode 8x32768 --decode_chain 8 --out DIR

benchmarks/attention.py times the kernels behind a stand-in selection (the
group's mean query against max-pooled keys). Here the step is the model's own
(models.attention.Attention with config.model.sparse.decode): the q/k/v
projections, the cache write, the gate's key statistics folded, its learned
selection (pooled statistics projected and rotated, softmax over key blocks,
top-k) and compact tables, the sparse decode kernel (`auto`), the output
projection. `dense` is the same layer without the gate: its decode reads the
whole cache through ops.attention (`auto`: cuDNN on a GPU). The layer has
attention.py's shape (--heads, --kv_heads, --head_dim; width heads x head_dim),
bf16 weights and compute, random parameters and a cache of random keys; the sparse layer
keeps --layer_keep of the key blocks (top_k, threshold 0), or follows
--layer_rule (e.g. threshold=0,coverage=0.5: the recipes' rule); the row reports
the blocks it kept along the chain and whether the layer's own step (on a GPU
the gate's two kernels, gate_step and gate_select) kept the XLA path's blocks. Each step chains
--decode_chain tokens in one program (the cache donated and carried), timed
in alternation (--repeats rounds of --iters calls); --trace_kernels N lists each
layer's N longest kernels from one traced call. Writes DIR/layer_decode.{json,md}.
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import decode_timeline  # noqa: E402
from configs import flash  # noqa: E402
from flashmm_jax import ops  # noqa: E402
from flashmm_jax.models import attention as model_attention  # noqa: E402
from flashmm_jax.models import gate  # noqa: E402

_KEEP = flags.DEFINE_float('layer_keep', 0.35, 'share of the key blocks the sparse layer keeps')
_RULE = flags.DEFINE_string('layer_rule', '', 'the sparse layer\'s selection rule instead of '
                            '--layer_keep, e.g. threshold=0,coverage=0.5 (models.gate.parse_rule)')
_TRACE = flags.DEFINE_integer('trace_kernels', 0, 'also trace one chained call of each '
                              'layer (JAX profiler, CUPTI) and report its N longest kernels')


def layer(sparse, n_k, keep):
  """An Attention layer of attention.py's shape; `sparse`: with its gate,
  decode steps sparse, keeping ceil(keep * n_k) blocks (first and last forced)."""
  hq, hkv, d = attention._HEADS.value, attention._KV_HEADS.value, attention._HEAD_DIM.value
  cfg = flash.get_config('tiny').model
  cfg.dtype = cfg.param_dtype = 'bfloat16'   # tiny computes in f32 (CPU tests)
  cfg.sparse.update(enabled=sparse, decode=sparse, block_k=attention._DECODE_BLOCK_K.value,
                    threshold=0.0,
                    top_k=attention.decode_budget(1 - keep, n_k) - 2, kernel='auto')
  if _RULE.value:
    cfg.sparse.update(dict(top_k=0, **gate.parse_rule(_RULE.value, '--layer_rule')))
  return model_attention.Attention(hq * d, hq, hkv, d, cfg, rngs=nnx.Rngs(0),
                                   rope_base=cfg.lm.rope_base)


def filled_cache(attn, batch, length):
  """attn's cache of `length` positions, every one written: random bf16 keys and
  values, and (sparse) finite random key statistics of full blocks."""
  cache = attn.init_cache(batch, length, jnp.bfloat16)
  keys = iter(jax.random.split(jax.random.key(1), len(cache)))
  for name, x in cache.items():
    r = jax.random.normal(next(keys), x.shape, jnp.float32)
    scale = attention._DECODE_BLOCK_K.value if name == 'gate_sum' else 1
    cache[name] = (r * scale).astype(x.dtype)
  return cache


def chain_selection(attn, x, batch, length, start, n):
  """The sparse layer's kept blocks along the timed chain (its n steps from
  position start, its input x, a filled cache, untimed): the mean count a
  row and step, the share of rows and steps where the layer's own step
  (step_tables with its `auto` kernel: on a GPU gate_step's and gate_select's
  kernels, on a CPU host the XLA path) keeps the XLA path's blocks, the most
  blocks a row's two sets differ by, and the largest error of the step's
  gate keys against XLA's (relative to their largest)."""
  g, cache = attn.block_gate, filled_cache(attn, batch, length)
  kept = lambda ids, count: [set(i[:c]) for i, c in zip(np.asarray(ids).reshape(
      -1, ids.shape[-1]).tolist(), np.asarray(count).reshape(-1).tolist())]

  @jax.jit
  def step(x, cache, pos):
    mask = ops.attention.MaskSpec(q_offset=pos, kv_len=pos + 1,
                                  prefix_len=jnp.zeros_like(pos), causal=True)
    q_raw, k_raw = attn.q(x), attn.k(x)
    ids, count, own = g.step_tables(q_raw, k_raw, cache, mask)   # the layer's own path
    xla = g.fold_keys(cache, k_raw, mask)
    selected = g.select_decode(q_raw, xla, mask)[:, :, 0]
    keys = own[gate.GATE_KEY], xla[gate.GATE_KEY]
    key_err = jnp.max(jnp.abs(keys[0] - keys[1])) / jnp.max(jnp.abs(keys[1]))
    y, cache = attn(x, pos[:, None], mask, cache)
    return rms_normalized(y), cache, (ids, count), selected, key_err

  counts, same, differ, key_errs = [], [], [], []
  for i in range(n):
    x, cache, tables, selected, key_err = step(x, cache, start + i)
    fused = kept(*tables)
    xla = [set(np.flatnonzero(row).tolist()) for row in
           np.asarray(selected).reshape(-1, selected.shape[-1])]
    counts += [len(s) for s in fused]
    same += [a == b for a, b in zip(fused, xla)]
    differ += [len(a ^ b) for a, b in zip(fused, xla)]
    key_errs.append(float(key_err))
  return dict(kept_mean=float(np.mean(counts)), same_rows=float(np.mean(same)),
              most_blocks_differing=max(differ), gate_key_rel_err=max(key_errs))


def rms_normalized(x):
  """x scaled to unit RMS over its last axis (an RMSNorm without its scale)."""
  f = x.astype(jnp.float32)
  return (f * jax.lax.rsqrt(jnp.mean(f * f, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def chained_steps(attn, n):
  """jitted (x [B, 1, W], cache, start [B]) -> (x, cache): n decode steps at
  positions start .. start + n - 1, each step's output, RMS-normalised, the
  next one's input; the cache is donated.

  The norm is a model's (its layers see normalised inputs). Fed back raw, the
  output (a small fraction of unit scale) made the next steps' gate logits
  near-uniform: under coverage 0.5 the steps after the first kept half the
  blocks, whatever the first kept (docs/results.md, 2026-12-01)."""
  graphdef, state = nnx.split(attn)

  def run(state, x, cache, start):
    module = nnx.merge(graphdef, state)
    for i in range(n):
      pos = start + i
      mask = ops.attention.MaskSpec(q_offset=pos, kv_len=pos + 1,
                                    prefix_len=jnp.zeros_like(pos), causal=True)
      x, cache = module(x, pos[:, None], mask, cache)
      x = rms_normalized(x)
    return x, cache
  step = jax.jit(run, donate_argnums=(2,))
  return lambda x, cache, start: step(state, x, cache, start)


def time_steps(fns, inputs, rounds, iters):
  """{name: median ms a call} of fns[name](x, cache, start) -> (x, cache),
  each fed its own output (the cache is donated), in alternation."""
  runs = {name: [] for name in fns}
  for _ in range(rounds + 1):   # the first round compiles and warms up
    for name, fn in fns.items():
      x, cache, start = inputs[name]
      t0 = time.perf_counter()
      for _ in range(iters):
        x, cache = fn(x, cache, start)
      jax.block_until_ready((x, cache))
      runs[name].append((time.perf_counter() - t0) / iters * 1e3)
      inputs[name] = (x, cache, start)
  return {name: statistics.median(t[1:]) for name, t in runs.items()}


def bench(batch, length):
  n_k, chain = length // attention._DECODE_BLOCK_K.value, attention._DECODE_CHAIN.value or 8
  start = jnp.full((batch,), length - chain, jnp.int32)
  fns, inputs = {}, {}
  for name in ('sparse', 'dense'):
    attn = layer(name == 'sparse', n_k, _KEEP.value)
    x = jax.random.normal(jax.random.key(2), (batch, 1, attn.o.out_shape[-1]), jnp.bfloat16)
    cache = filled_cache(attn, batch, length)
    if attn.sparse_decode(1, cache) != (name == 'sparse'):
      raise ValueError(f'the {name} layer would not decode {name}ly at cache {length}')
    fns[name] = chained_steps(attn, chain)
    inputs[name] = (x, cache, start)
    if name == 'sparse':
      selection = chain_selection(attn, x, batch, length, start, chain)
  ms = time_steps(fns, inputs, attention._REPEATS.value, attention._ITERS.value)
  row = dict(batch=batch, cache=length, block_k=attention._DECODE_BLOCK_K.value, chain=chain,
             rule=_RULE.value or f'keep={_KEEP.value}',
             kept_blocks=selection['kept_mean'], same_selection=selection['same_rows'],
             most_blocks_differing=selection['most_blocks_differing'],
             gate_key_rel_err=selection['gate_key_rel_err'],
             ms={name: t / chain for name, t in ms.items()})
  row['speedup'] = row['ms']['dense'] / row['ms']['sparse']
  if _TRACE.value:
    row['kernels'] = {name: traced(fns[name], inputs[name], chain, _TRACE.value)
                      for name in fns}
  print(row)
  return row


def traced(fn, inputs, chain, top):
  """One call of fn under JAX's profiler: the GPU kernels' busy time a step
  (us), how many a step, and the `top` longest (us a step, summed by name)."""
  events = decode_timeline.profiled_kernels(lambda: jax.block_until_ready(fn(*inputs)))
  by_name = {}
  for _, duration, name in events:
    by_name[name] = by_name.get(name, 0.0) + duration / 1e3 / chain
  longest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return dict(busy_us=sum(by_name.values()), per_step=len(events) / chain,
              longest={name[:60]: us for name, us in longest})


def markdown(rows, env):
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: one attention layer's decode "
           "step (projections, cache write, selection, attention), the learned gate's "
           "sparse path against the same layer dense, ms a step of a chain", '',
           '| batch x cache | rule | blocks kept (mean) | same as XLA\'s | sparse | dense '
           '| speed-up |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(f"| {r['batch']} x {r['cache']} | {r['rule']} | {r['kept_blocks']:.1f} of "
                 f"{r['cache'] // r['block_k']} | {r['same_selection']:.0%} "
                 f"| {r['ms']['sparse']:.4f} | {r['ms']['dense']:.4f} | {r['speedup']:.2f}x |")
  for r in rows:
    for name, k in r.get('kernels', {}).items():
      longest = ', '.join(f'`{n}` {us:.1f}' for n, us in k['longest'].items())
      lines.append(f"\n{r['batch']} x {r['cache']}, {name}: {k['per_step']:g} kernels and "
                   f"{k['busy_us']:.1f} us of GPU time a step; the longest (us a step): {longest}")
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('layer_decode',
                         [bench(*shape) for shape in attention.decode_shapes()], markdown)


if __name__ == '__main__':
  app.run(main)
