"""benchmarks/kernel_ab.py loads the versions it compares by file, each named by
its stem, and refuses a missing file or a clashing name."""

import shutil

import pytest

from benchmarks import kernel_ab
from pallas_kernels.sparse_attention import mosaic_gpu


def test_loads_each_version_by_its_stem(tmp_path):
  for stem in ('head', 'other'):
    shutil.copy(mosaic_gpu.__file__, tmp_path / f'{stem}.py')
  bases = kernel_ab.load_bases([str(tmp_path / 'head.py'), str(tmp_path / 'other.py')])
  assert list(bases) == ['head', 'other']
  assert bases['head'] is not mosaic_gpu
  assert bases['head'].TILE_Q == mosaic_gpu.TILE_Q


@pytest.mark.parametrize('name', ['missing.py', 'new.py'])
def test_a_missing_file_or_the_reserved_stem_is_refused(tmp_path, name):
  if name == 'new.py':   # 'new' names this tree's version in the tables
    shutil.copy(mosaic_gpu.__file__, tmp_path / name)
  with pytest.raises(SystemExit, match='no such file, or its stem is taken'):
    kernel_ab.load_bases([str(tmp_path / name)])


def test_a_file_that_is_not_the_kernel_module_is_refused(tmp_path):
  (tmp_path / 'other.py').write_text('X = 1\n')
  with pytest.raises(SystemExit, match='not a version of mosaic_gpu.py'):
    kernel_ab.load_bases([str(tmp_path / 'other.py')])
