"""benchmarks/budgets.py: the block budgets every benchmark's sparsity rests on."""

import numpy as np
import pytest

from benchmarks import budgets


@pytest.mark.parametrize('seq, block_k', [(4096, 128), (4096, 64), (8192, 128), (16384, 64),
                                          (1152, 128), (640, 64)])
@pytest.mark.parametrize('keep', [0.2, 0.35, 0.5, 1.0])
def test_row_budgets_keep_the_named_share(seq, block_k, keep):
  """The budgets add up to keep x visible tiles (to one block), each row within
  [its forced, its visible] blocks, where the forced ones leave room; at 4k /
  128 rounding each row up kept 38.3%."""
  visible = budgets.visible_tiles(seq, 128, block_k)
  forced = budgets.forced_tiles(seq, 128, block_k)
  rows = budgets.row_budgets(keep, visible, forced)
  assert rows.dtype == np.int32 and rows.shape == (seq // 128,)
  lo = (forced & visible).sum(-1)
  assert np.all(rows >= lo) and np.all(rows <= visible.sum(-1))
  if lo.sum() < keep * visible.sum():
    assert abs(budgets.sparsity(rows, visible) - (1 - keep)) <= 1 / visible.sum()
  else:   # short sequences: the forced blocks alone are more than the share
    np.testing.assert_array_equal(rows, lo)
  np.testing.assert_array_equal(rows, budgets.causal_row_budgets(keep, seq, 128, block_k))


def test_row_budgets_share_evenly_and_keep_order():
  """Rows of the same visible count get budgets at most one apart, and a row
  seeing more keeps at least as many blocks."""
  visible = budgets.visible_tiles(8192, 128, 64)
  rows = budgets.row_budgets(0.35, visible, budgets.forced_tiles(8192, 128, 64))
  assert np.all(np.diff(rows) >= 0)
  ideal = 0.35 * visible.sum(-1)
  assert np.all(np.abs(rows - ideal)[4:] <= 1)   # past the rows the forced blocks fill


def test_forced_blocks_alone_can_exceed_the_share():
  """At keep 0 every row still keeps its first and diagonal blocks."""
  visible = budgets.visible_tiles(1024, 128, 128)
  forced = budgets.forced_tiles(1024, 128, 128)
  rows = budgets.row_budgets(0.0, visible, forced)
  np.testing.assert_array_equal(rows, (forced & visible).sum(-1))
  assert rows.tolist() == [1] + [2] * 7


def test_prefix_tiles_are_visible_and_keep_is_checked():
  visible = budgets.visible_tiles(512, 128, 64, prefix=300)
  assert visible[0].sum() == 5 and visible[-1].all()   # the prefix reaches block 4
  with pytest.raises(ValueError, match='keep=1.5'):
    budgets.row_budgets(1.5, visible, budgets.forced_tiles(512, 128, 64))


def test_sparsity_counts_every_row_of_the_tables():
  visible = budgets.visible_tiles(256, 128, 128)        # 1 + 2 visible tiles
  counts = np.array([[[1, 1]], [[1, 2]]])                # [B=2, Hkv=1, nQ=2]
  assert budgets.sparsity(counts, visible) == pytest.approx(1 - 5 / 6)


def test_mask_tables_list_each_rows_visible_tiles():
  visible = budgets.visible_tiles(512, 128, 64, prefix=200)
  ids, count = budgets.mask_tables(visible)
  np.testing.assert_array_equal(count, visible.sum(-1))
  for row, (listed, n) in enumerate(zip(ids, count)):
    assert listed[:n].tolist() == np.flatnonzero(visible[row]).tolist()
    assert (listed[n:] == listed[n - 1]).all()
