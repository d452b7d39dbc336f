"""How many key blocks each query tile keeps in the benchmarks' block-sparse runs.

Flag-free, so attention.py, tile_balance.py and the tests share one rule. A
sparsity the benchmarks name is the one their kernels compute: a run "at 65%"
keeps 35% of all visible (causal / prefix) tiles. Rounding each row's budget up
on its own, with the first and diagonal blocks forced, kept 38.3% at 4k with
128-key blocks (61.7% sparse) and so timed 9% more work than the name said.
"""

import numpy as np


def visible_tiles(seq, block_q, block_k, prefix=0):
  """bool [nQ, nK]: tiles holding at least one visible (causal/prefix) key."""
  q_last = (np.arange(seq // block_q) + 1) * block_q - 1
  k_first = np.arange(seq // block_k) * block_k
  return (k_first[None, :] <= q_last[:, None]) | (k_first[None, :] < prefix)


def forced_tiles(seq, block_q, block_k):
  """bool [nQ, nK]: the first key block and every key block starting inside the
  tile's own rows (each query sees itself), kept whatever the scores."""
  k_first = np.arange(seq // block_k)[None] * block_k
  q_first = np.arange(seq // block_q)[:, None] * block_q
  return ((k_first >= q_first) & (k_first < q_first + block_q)) | (k_first == 0)


def mask_tables(visible):
  """(ids int32 [nQ, W], count int32 [nQ]) listing each row's visible tiles
  ascending, W the longest row, shorter rows padded with their last id (as
  block_tables.compact_rows pads): the tables of a budget that keeps every
  visible tile, which need no scores."""
  visible = np.asarray(visible, bool)
  count = visible.sum(-1).astype(np.int32)
  ids = np.zeros((visible.shape[0], max(int(count.max()), 1)), np.int32)
  for r, row in enumerate(visible):
    listed = np.flatnonzero(row)
    if listed.size:
      ids[r] = np.concatenate([listed, np.full(ids.shape[1] - listed.size, listed[-1])])
  return ids, count


def row_budgets(keep, visible, forced):
  """int32 [nQ]: key blocks each query tile keeps, `keep` of all visible tiles.

  Every row keeps the same share s of its visible blocks, clipped to [its
  forced, its visible] count; s is chosen so the clipped shares add up to
  round(keep x visible tiles), and the fractions are rounded by largest
  remainder (earlier rows first on ties). Where the forced blocks alone exceed
  that total, every row keeps just its forced ones.
  """
  if not 0.0 <= keep <= 1.0:
    raise ValueError(f'row_budgets: keep={keep} must be in [0, 1]')
  vis = np.asarray(visible).sum(-1).astype(np.float64)
  lo = np.asarray(forced & visible).sum(-1).astype(np.float64)
  total = round(keep * vis.sum())
  if lo.sum() >= total:
    return lo.astype(np.int32)
  share = lambda s: np.clip(s * vis, lo, vis)
  low, high = 0.0, 1.0
  for _ in range(60):   # the clipped total grows with s: bisect it
    mid = (low + high) / 2
    low, high = (mid, high) if share(mid).sum() < total else (low, mid)
  ideal = share(high)
  rows = np.floor(ideal + 1e-9)
  extra = int(total - rows.sum())
  order = np.argsort(-(ideal - rows), kind='stable')
  rows[order[:extra]] += 1
  return rows.astype(np.int32)


def causal_row_budgets(keep, seq, block_q, block_k):
  """row_budgets of a causal mask over seq positions (no prefix)."""
  return row_budgets(keep, visible_tiles(seq, block_q, block_k),
                     forced_tiles(seq, block_q, block_k))


def sparsity(counts, visible):
  """Block sparsity that kv counts [..., nQ] (one row of tables per leading
  index: batch, kv head) achieve over visible tiles [nQ, nK]."""
  counts = np.asarray(counts)
  rows = counts.size // counts.shape[-1]
  return 1.0 - float(counts.sum()) / float(np.sum(visible) * rows)
