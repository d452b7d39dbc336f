"""The 12 procedural tasks: validity, determinism, balance and what the pixels say."""

import collections

import numpy as np
import pytest

from flashmm_jax.data import scene
from flashmm_jax.data.tasks import (TASK_NAMES, TASKS, get_task, make_example, resolve_tasks,
                                    task_id, task_metric)
from flashmm_jax.data.tasks import chart, ct, describe, digits

N_BALANCE = 60  # examples per task for distribution checks


def _examples(task, n, size=32, split='train', seed=0):
  return [make_example(task, split, i, seed, size) for i in range(n)]


def test_registry_has_the_twelve_tasks_in_order():
  assert len(TASK_NAMES) == 12
  assert set(TASKS) == set(TASK_NAMES)
  assert [task_id(t) for t in TASK_NAMES] == list(range(12))
  assert task_id('vqa') == 12
  assert {get_task(t).metric for t in TASK_NAMES} == {'exact', 'caption'}
  assert get_task('caption').metric == 'caption'
  assert task_metric('vqa') == 'exact' and task_metric('caption') == 'caption'
  with pytest.raises(ValueError, match="Unknown task 'vqa2'"):
    task_metric('vqa2')


@pytest.mark.parametrize('task', TASK_NAMES)
@pytest.mark.parametrize('size', [32, 64])
def test_examples_are_valid(task, size):
  for ex in _examples(task, 6, size):
    assert set(ex) == {'image', 'prompt', 'answer', 'task'}
    assert ex['task'] == task
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (size, size, 3)
    assert ex['prompt'] and ex['answer']
    assert ex['answer'] == ex['answer'].lower() == ex['answer'].strip()
    assert ex['prompt'] == ex['prompt'].lower()


def test_ct_lesion_renders_at_512():
  ex = make_example('ct_lesion', 'eval', 3, 0, 512)
  assert ex['image'].shape == (512, 512, 3) and ex['image'].dtype == np.uint8


@pytest.mark.parametrize('task', ['vqa_spatial', 'caption', 'chart_read', 'read_digits'])
def test_grid_tasks_render_at_512(task):
  assert make_example(task, 'train', 0, 0, 512)['image'].shape == (512, 512, 3)


@pytest.mark.parametrize('task', TASK_NAMES)
def test_answer_distribution_is_not_degenerate(task):
  counts = collections.Counter(ex['answer'] for ex in _examples(task, N_BALANCE, size=16))
  assert len(counts) >= 3, counts
  # No answer takes more than half: chance accuracy stays low.
  assert counts.most_common(1)[0][1] <= N_BALANCE // 2, counts


@pytest.mark.parametrize('task', ['vqa_spatial', 'vqa_compare', 'ct_lesion'])
def test_yes_no_is_balanced(task):
  answers = [ex['answer'] for ex in _examples(task, 400, size=16)]
  yes, no = answers.count('yes'), answers.count('no')
  assert yes + no > 60
  assert abs(yes - no) < 0.25 * (yes + no), (yes, no)


def test_examples_are_deterministic_and_splits_differ():
  for task in TASK_NAMES:
    a = make_example(task, 'train', 7, 3, 32)
    b = make_example(task, 'train', 7, 3, 32)
    assert a['prompt'] == b['prompt'] and a['answer'] == b['answer']
    np.testing.assert_array_equal(a['image'], b['image'])
  # Across the suite, the eval split and another seed give other examples.
  def fingerprint(split, seed):
    return [(e['prompt'], e['answer'], e['image'].tobytes())
            for t in TASK_NAMES for e in [make_example(t, split, 7, seed, 32)]]
  train, evals, reseeded = fingerprint('train', 3), fingerprint('eval', 3), fingerprint('train', 4)
  assert sum(x != y for x, y in zip(train, evals)) >= 11
  assert sum(x != y for x, y in zip(train, reseeded)) >= 11


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="Unknown task 'vqa_colour'.*vqa_color"):
    make_example('vqa_colour', 'train', 0, 0, 32)
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    make_example('caption', 'test', 0, 0, 32)
  with pytest.raises(ValueError, match='image_size'):
    make_example('caption', 'train', 0, 0, 8)
  with pytest.raises(ValueError, match='Unknown task'):
    resolve_tasks(['caption', 'nope'])
  assert resolve_tasks(()) == TASK_NAMES
  assert resolve_tasks('caption,grounding') == ('caption', 'grounding')


def _has_colour(pixels, name):
  target = np.array(scene.COLOURS[name], np.int32)
  return bool((np.abs(pixels.astype(np.int32) - target).max(-1) <= scene.COLOUR_JITTER).any())


def test_vqa_color_answer_is_in_the_image():
  for ex in _examples('vqa_color', 20, size=64):
    assert _has_colour(ex['image'], ex['answer'])


def test_grounding_answer_cell_holds_the_target_colour():
  for ex in _examples('grounding', 20, size=64):
    colour = ex['prompt'].split()[-2]
    _, row, _, col = ex['answer'].split()
    y0, y1, x0, x1 = scene.cell_box(64, int(row) - 1, int(col) - 1)
    assert _has_colour(ex['image'][y0:y1, x0:x1], colour), ex['answer']


def test_caption_lists_at_most_four_objects_in_reading_order():
  for ex in _examples('caption', 30):
    items = ex['answer'].split(', ')
    assert 1 <= len(items) <= describe.MAX_CAPTION_OBJECTS
    for item in items:
      colour, shape = item.split()
      assert colour in scene.COLOUR_NAMES and shape in scene.SHAPES
  assert describe.caption_items('red circle, blue square') == {('red', 'circle'),
                                                               ('blue', 'square')}


def _bar_height(image, colour):
  """Reads a bar's height in units back from the pixels."""
  size = image.shape[0]
  unit = (size - 2 * max(int(round(size * chart.MARGIN)), 1)) / chart.MAX_HEIGHT
  target = np.array(scene.COLOURS[colour], np.int32)
  rows = np.nonzero((np.abs(image.astype(np.int32) - target).max(-1)
                     <= scene.COLOUR_JITTER).any(1))[0]
  return int(round((rows.max() + 1 - rows.min()) / unit))


def test_chart_heights_can_be_read_from_pixels():
  checked = 0
  for ex in _examples('chart_read', 30, size=64):
    if ex['prompt'].startswith('how tall'):
      colour = ex['prompt'].split()[-2]
      assert _bar_height(ex['image'], colour) == int(ex['answer'])
      checked += 1
  assert checked >= 5


def test_ct_lesion_shows_in_the_answered_quadrant():
  size = 64
  base = np.round(ct.phantom(size) * 255)
  half = size // 2
  quadrants = {'upper left': (slice(0, half), slice(0, half)),
               'upper right': (slice(0, half), slice(half, None)),
               'lower left': (slice(half, None), slice(0, half)),
               'lower right': (slice(half, None), slice(half, None))}
  for ex in _examples('ct_lesion', 40, size=size):
    if ex['answer'] not in quadrants:
      continue
    diff = np.abs(ex['image'][..., 0].astype(np.float32) - base) > 60  # far above noise
    hits = {name: int(diff[q].sum()) for name, q in quadrants.items()}
    assert max(hits, key=hits.get) == ex['answer'], hits


def test_digit_glyphs_are_held_out_between_splits():
  sets = digits._glyph_sets()
  for d in range(10):
    train = {g.tobytes() for g in sets['train'][d]}
    evals = {g.tobytes() for g in sets['eval'][d]}
    assert train and evals and not train & evals


def test_read_digits_inks_one_cell_per_digit_in_one_row():
  for ex in _examples('read_digits', 20, size=64):
    inked = []
    for row in range(scene.GRID):
      for col in range(scene.GRID):
        y0, y1, x0, x1 = scene.cell_box(64, row, col)
        if (ex['image'][y0:y1, x0:x1] > 128).any():
          inked.append((row, col))
    assert len(inked) == len(ex['answer']), (inked, ex['answer'])
    assert len({r for r, _ in inked}) == 1
