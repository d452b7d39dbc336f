"""How evenly the persistent forward's deal spreads causal tiles over CTAs (a model, CPU).

A tile of 128 query rows costs its listed key blocks (budgets.row_budgets,
the benchmarks' rule: keep of the visible blocks, its first and diagonal forced);
a CTA's load is the sum over the tiles mosaic_gpu._work deals it, and the
kernel's time goes with the busiest CTA. Beside it, one CTA a tile scheduled
by the hardware (greedy: each tile to the first free SM), each paying
--overhead blocks' time more (launch, q load, ring fill). docs/results.md
fits the overhead to the H200 timings and quotes these figures:

  python benchmarks/tile_balance.py --overhead 1.25

--deal batch_slowest numbers the tiles as the first persistent kernel did
(heads, then query tiles from the last, then the batch).
"""

import heapq
import os
import sys

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import budgets  # noqa: E402
from pallas_kernels.sparse_attention import mosaic_gpu  # noqa: E402

_SHAPES = flags.DEFINE_list('shapes', ['4x32', '2x64', '1x128'], 'batch x query tiles')
_KEEPS = flags.DEFINE_list('keeps', ['1.0', '0.35'], 'kept share of the visible blocks')
_HEADS = flags.DEFINE_integer('heads', 16, 'query heads')
_CTAS = flags.DEFINE_integer('ctas', 132, 'CTAs (the SM count)')
_OVERHEAD = flags.DEFINE_float('overhead', 1.25, 'extra blocks of time a one-tile CTA pays')
_DEAL = flags.DEFINE_enum('deal', 'current', ['current', 'batch_slowest'], 'the tile deal')


def row_blocks(n_q, keep):
  """Key blocks (128 keys) listed for each of n_q causal query tiles."""
  return budgets.causal_row_budgets(keep, n_q * mosaic_gpu.TILE_Q, mosaic_gpu.TILE_Q, 128)


def persistent_loads(batch, n_q, keep):
  """Blocks each CTA computes under the deal."""
  blocks = row_blocks(n_q, keep)
  st = mosaic_gpu._Static(block_k=128, num_stages=2, scale=1.0, dtype=jnp.bfloat16,  # pylint: disable=protected-access
                          interpreted=True, batch=batch, hq=_HEADS.value, group=4,
                          n_q=n_q, width=1, ctas=_CTAS.value)
  if _DEAL.value == 'batch_slowest':   # tile w: head fastest, then last query tile first
    loads = np.zeros(st.ctas)
    for w in range(st.tiles):
      r, c = divmod(w, st.ctas)
      qt = n_q - 1 - (w // st.hq) % n_q
      loads[c if r % 2 == 0 else st.ctas - 1 - c] += blocks[qt]
    return loads
  return np.array([sum(blocks[int(mosaic_gpu._work(c, i, st)[2])]  # pylint: disable=protected-access
                       for i in range(int(mosaic_gpu._tile_count(c, st))))  # pylint: disable=protected-access
                   for c in range(st.ctas)])


def greedy_makespan(batch, n_q, keep):
  """One CTA a tile, longest first, each to the first free SM."""
  blocks = row_blocks(n_q, keep)
  costs = [blocks[n_q - 1 - r] + _OVERHEAD.value
           for r in range(n_q) for _ in range(batch * _HEADS.value)]
  free = [0.0] * _CTAS.value
  for cost in costs:
    heapq.heappush(free, heapq.heappop(free) + cost)
  return max(free)


def main(_):
  print(f'deal {_DEAL.value}, {_CTAS.value} CTAs, {_HEADS.value} heads, '
        f'overhead {_OVERHEAD.value} blocks a one-tile CTA')
  print('| batch x query tiles | keep | busiest CTA | mean | one CTA a tile (model) | '
        'persistent / one a tile |')
  print('| --- | --- | --- | --- | --- | --- |')
  for shape in _SHAPES.value:
    batch, n_q = map(int, shape.split('x'))
    for keep in map(float, _KEEPS.value):
      loads = persistent_loads(batch, n_q, keep)
      one_each = greedy_makespan(batch, n_q, keep)
      print(f'| {shape} | {keep} | {loads.max():.0f} | {loads.mean():.1f} | {one_each:.1f} | '
            f'{loads.max() / one_each:.3f} |')


if __name__ == '__main__':
  app.run(main)
