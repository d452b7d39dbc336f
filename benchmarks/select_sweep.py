"""The fused selection's scoring launch under several Triton configurations.

  python benchmarks/select_sweep.py --out DIR [--seqs 4096,8192] \
      [--score_configs 4x16x3,8x32x3]

select_triton.score_tables reads all of q (64 MB at 16k tokens) in one wave
of programs, one a query tile, then scores and selects; under Nsight Compute
at 8k it ran at ~2.9 TB/s (docs/results.md). Each WARPSxROWSxSTAGES entry
sets its num_warps, rows_per_load and num_stages; the whole `fused`
selection (attention.select_blocks, pool_keys included), or with
--sweep_forward the persistent forward with it inside, is timed per entry,
alternating entries batch by batch, and its tables are checked against the
first entry's. Shape flags are attention.py's. Writes select_sweep.json/.md.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import attention  # noqa: E402
from benchmarks import timing  # noqa: E402

_CONFIGS = flags.DEFINE_list('score_configs', ['4x32x3', '4x16x3', '8x16x3', '8x32x3',
                                               '4x16x4', '8x32x2', '4x8x4'],
                             'WARPSxROWSxSTAGES of score_tables (the first: the reference)')
_KEEP = flags.DEFINE_float('keep', 0.35, 'share of the visible blocks each row keeps')
_BLOCK = flags.DEFINE_integer('sweep_block_k', 128, 'key block')
_ROUNDS = flags.DEFINE_integer('sweep_rounds', 7, 'alternating timed batches (median)')
_FORWARD = flags.DEFINE_bool('sweep_forward', False, 'time the whole 65%-style forward (the '
                             'selection, then the persistent Mosaic kernel) per entry, in '
                             'place of the selection alone: timed alone a selection is '
                             'dispatch-bound')


def score_options(spec):
  fields = spec.split('x')
  if len(fields) != 3 or not all(f.isdigit() for f in fields):
    raise ValueError(f'--score_configs entry {spec!r} is not WARPSxROWSxSTAGES (e.g. 4x16x3)')
  warps, rows, stages = map(int, fields)
  return dict(num_warps=warps, rows_per_load=rows, num_stages=stages)


flags.register_validator('score_configs', lambda specs: attention._parses(score_options, specs),
                         '--score_configs: WARPSxROWSxSTAGES entries')


def sweep(seq):
  q, k, v = attention.make_inputs(seq)
  bk = _BLOCK.value
  # (run, select): the persistent forward with the selection inside, and it alone.
  paths = {spec: attention.sparse_fn(_KEEP.value, seq, 0, bk, 2, method='fused',
                                     persistent_ctas=attention.sm_count() if _FORWARD.value
                                     else 0, score_options=score_options(spec))[:2]
           for spec in _CONFIGS.value}
  row = dict(seq=seq, batch=q.shape[0], block_k=bk, forward=_FORWARD.value, ms={}, same={},
             errors={})
  want = paths[_CONFIGS.value[0]][1](q, k)
  for spec, (_, select) in list(paths.items()):
    try:
      row['same'][spec] = attention.same_tables(select(q, k), want)
    except Exception as e:   # e.g. a configuration Triton cannot compile: reported
      row['errors'][spec] = f'{type(e).__name__}: {str(e)[-300:]}'
      del paths[spec]
  fns = {spec: run if _FORWARD.value else select for spec, (run, select) in paths.items()}
  args = (q, k, v) if _FORWARD.value else (q, k)
  row['ms'] = timing.time_alternating(fns, *args, rounds=_ROUNDS.value,
                                      iters=attention._ITERS.value)
  print(json.dumps(row))
  return row


def markdown(rows, env):
  specs = _CONFIGS.value
  timed = ('the persistent forward with the fused selection inside' if _FORWARD.value
           else 'the fused selection (pool_keys + score_tables)')
  lines = [f"{env['device']}, jax {env['jax']}, {env['date']}: {timed}, "
           f'keep {_KEEP.value}, block_k {_BLOCK.value}, ms '
           f'(median of {_ROUNDS.value} alternating batches); score_tables as '
           'WARPSxROWSxSTAGES; * = tables differ from the first entry\'s', '',
           '| seq | ' + ' | '.join(specs) + ' |', '| --- ' * (1 + len(specs)) + '|']
  for r in rows:
    cells = [('failed' if s in r['errors'] else
              f"{r['ms'][s]:.4f}{'' if r['same'][s] else ' *'}") for s in specs]
    lines.append(f"| {r['seq']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(_):
  attention.write_report('select_sweep', [sweep(int(seq)) for seq in attention._SEQS.value],
                         markdown)


if __name__ == '__main__':
  app.run(main)
