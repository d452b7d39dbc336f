"""A/B of the Mosaic decode kernel: this tree's against other versions', in one
run, inside the whole 65% decode step, per call and chained.

  git show REV:pallas_kernels/sparse_attention/mosaic_gpu_decode.py > /tmp/base_dec.py
  python benchmarks/decode_ab.py --base /tmp/base_dec.py --decode 8x32768,1x32768 \\
      --rounds 15 --decode_chain 8 --out DIR

One process, the same inputs, every step timed in alternation
(timing.time_alternating) with cuDNN's dense decode among them: a step is
attention.py's decode selection (--select_method's first decode method, its
block scores against the pooled keys, 65% of the blocks skipped) and a
version's kernel at its defaults; `new_<method>`, this tree's kernel after each
other decode method of --select_method; `new_ranked_cCHUNKwWARPS`, after the
`ranked` selection at each --ranked_launch shape. `new_headmajor` runs this tree's step on the
same cache laid out head-major (each kv head's blocks contiguous:
attention.head_major_decode_args). `selecting_<stem>` runs each --selecting
file's sparse_decode, a kernel that selects the blocks itself: it takes the
pooled keys and the budget instead of the tables. Each step is timed per call and as
--decode_chain steps chained in one program (attention.chained), per step.
Reports ms, the ratio to cuDNN's, time over new's, and the output's relative
error against new's.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import kernel_ab  # noqa: E402
from benchmarks import timing  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu_decode  # noqa: E402

_HEAD_MAJOR = flags.DEFINE_bool('head_major', True, 'also time new_headmajor')
_RANKED_LAUNCH = flags.DEFINE_list('ranked_launch', [], 'CHUNKxWARPS launch shapes of the '
                                   '`ranked` selection: each also times this tree\'s kernel '
                                   'after it, as new_ranked_cCHUNKwWARPS')
_SELECTING = flags.DEFINE_list('selecting', [], 'decode kernels that select their blocks '
                               'themselves (files; each named by its stem): sparse_decode(q, '
                               'k, v, pooled, kv_len, prefix_len, q_offset, *, '
                               'budget, block_k, interpret)')


def selecting_step(module, budget, block_k):
  """A step through a kernel that selects its blocks itself (--selecting)."""
  interpret = jax.default_backend() == 'cpu'
  return jax.jit(lambda q, k, v, pooled, *lens: module.sparse_decode(
      q, k, v, pooled, *lens, budget=budget, block_k=block_k, interpret=interpret))


def bench(batch, cache, bases, selecting=None):
  block_k = attention._DECODE_BLOCK_K.value
  args, budget, method = attention.decode_case(batch, cache, block_k)
  q, kc = args[:2]
  others = attention.decode_select_methods()[1:]
  steps = {name: attention.mosaic_decode_step(budget, method, block_k, module)
           for name, module in {'new': mosaic_gpu_decode, **bases}.items()}
  # This tree's kernel after each other selection method: `new_<method>`.
  steps |= {f'new_{m}': attention.mosaic_decode_step(budget, m, block_k) for m in others}
  for spec in _RANKED_LAUNCH.value:
    chunk, warps = map(int, spec.split('x'))
    steps[f'new_ranked_c{chunk}w{warps}'] = attention.mosaic_decode_step(
        budget, 'ranked', block_k, select_options=dict(chunk=chunk, num_warps=warps))
  for name, module in (selecting or {}).items():
    steps[f'selecting_{name}'] = selecting_step(module, budget, block_k)
  want = np.asarray(steps['new'](*args), np.float32)
  row = dict(batch=batch, cache=cache, block_k=block_k, select=method, rel_err={})
  for name, step in steps.items():
    row['rel_err'][name] = attention.rel_err(step(*args), want)
  if jax.default_backend() == 'gpu':
    steps['cudnn'] = attention.cudnn_decode_step
  hkv = kc.shape[2]
  chain = attention._DECODE_CHAIN.value or 8
  row['chain'] = chain
  rounds, iters = kernel_ab._ROUNDS.value, attention._ITERS.value
  row['ms'] = timing.time_alternating(steps, *args, rounds=rounds, iters=iters)
  row['chain_ms'] = {n: ms / chain for n, ms in timing.time_alternating(
      {n: attention.chained(s, chain) for n, s in steps.items()}, *args,
      rounds=rounds, iters=iters).items()}
  if _HEAD_MAJOR.value:
    head_major = attention.head_major_decode_args(*args, hkv=hkv)
    hm = steps['new']
    repeats = attention._REPEATS.value
    row['ms']['new_headmajor'] = timing.time_ms(hm, *head_major, iters=iters, repeats=repeats)
    row['chain_ms']['new_headmajor'] = timing.time_ms(
        attention.chained(hm, chain), *head_major, iters=iters, repeats=repeats) / chain
    out = np.asarray(hm(*head_major), np.float32).reshape(batch, hkv, 1, -1, q.shape[-1])
    row['rel_err']['new_headmajor'] = attention.rel_err(
        out.transpose(0, 2, 1, 3, 4).reshape(q.shape), want)
  for key in ('ms', 'chain_ms'):
    base = row[key].get('cudnn')
    row[key + '_ratio'] = {n: base / ms for n, ms in row[key].items()} if base else {}
    row[key + '_over_new'] = {n: ms / row[key]['new'] for n, ms in row[key].items()}
  print(json.dumps(row))
  return row


def markdown(rows, env):
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}; one decode step at 65% "
           f"sparsity, blocks of {rows[0]['block_k']} keys (selection `{rows[0]['select']}` "
           "inside), median of "
           f"{kernel_ab._ROUNDS.value} alternating batches (new_headmajor timed after "
           "them): ms per call and per step of a chain (speed-up over cuDNN's; time over "
           "new's; output rel. err against new's)", '',
           '| batch x cache | path | per call | chained |', '| --- | --- | --- | --- |']
  for r in rows:
    for n in r['ms']:
      cells = [f"{r[k][n]:.4f} ({r[k + '_ratio'].get(n, float('nan')):.2f}x; "
               f"{r[k + '_over_new'][n]:.3f})" for k in ('ms', 'chain_ms')]
      err = r['rel_err'].get(n)
      lines.append(f"| {r['batch']} x {r['cache']} | {n}"
                   + (f' (err {err:.1e})' if err is not None else '') + ' | '
                   + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(_):
  bases = kernel_ab.load_bases(kernel_ab._BASE.value or [], ('sparse_decode',),
                               'mosaic_gpu_decode.py')
  selecting = kernel_ab.load_bases(_SELECTING.value, ('sparse_decode',), 'a selecting kernel')
  kernel_ab.report('decode_ab', lambda: [bench(*shape, bases, selecting)
                                         for shape in attention.decode_shapes()], markdown,
                   selecting=_SELECTING.value)


if __name__ == '__main__':
  app.run(main)
