"""The batch contract, resumable train batches, process slicing and eval padding."""

import itertools

import numpy as np
import pytest

from flashmm_jax.data import BATCH_KEYS, encode_example, eval_batches, eval_examples, train_batches
from flashmm_jax.data.tasks import TASK_NAMES, make_example, task_id


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_encode_example_layout(suite_tokenizer):
  tok = suite_tokenizer
  ex = make_example('grounding', 'train', 0, 0, 32)
  enc = encode_example(tok, ex, 48)
  prompt, answer = tok.encode(ex['prompt']), tok.encode(ex['answer'])
  n = 1 + len(prompt) + len(answer) + 1
  assert enc['text'].dtype == np.int32 and enc['text'].shape == (48,)
  assert list(enc['text'][:n]) == [tok.bos_id] + prompt + answer + [tok.eos_id]
  assert not enc['text'][n:].any()
  assert enc['prefix_len'] == 1 + len(prompt) and enc['text_len'] == n
  expected_mask = np.zeros(48, np.float32)
  expected_mask[1 + len(prompt):n] = 1
  np.testing.assert_array_equal(enc['target_mask'], expected_mask)
  assert enc['task_id'] == task_id('grounding')


def test_encode_without_answer(suite_tokenizer):
  ex = make_example('caption', 'eval', 0, 0, 32)
  enc = encode_example(suite_tokenizer, ex, 48, with_answer=False)
  assert enc['text_len'] == enc['prefix_len'] == 1 + len(suite_tokenizer.encode(ex['prompt']))
  assert not enc['target_mask'].any()
  assert not enc['text'][enc['text_len']:].any()


def test_encode_too_long_names_task_and_counts(suite_tokenizer):
  ex = make_example('text_reasoning', 'train', 0, 0, 32)
  with pytest.raises(ValueError, match=r"Task 'text_reasoning': example needs \d+ tokens.*"
                                       r'max_text_len is 8'):
    encode_example(suite_tokenizer, ex, 8)


def test_train_batch_contract(tiny_config, suite_tokenizer):
  batch = next(train_batches(tiny_config, suite_tokenizer))
  b, size, length = 8, 32, 48
  assert set(batch) == set(BATCH_KEYS)
  expected = {'image': (np.uint8, (b, size, size, 3)), 'text': (np.int32, (b, length)),
              'prefix_len': (np.int32, (b,)), 'text_len': (np.int32, (b,)),
              'target_mask': (np.float32, (b, length)), 'task_id': (np.int32, (b,))}
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  for row in range(b):
    text, n, p = batch['text'][row], batch['text_len'][row], batch['prefix_len'][row]
    assert text[0] == suite_tokenizer.bos_id and text[n - 1] == suite_tokenizer.eos_id
    assert not text[n:].any() and (text[:n] != 0).all()
    assert batch['target_mask'][row].sum() == n - p
    assert batch['target_mask'][row, p:n].all()


def test_train_batches_resume_exactly(tiny_config, suite_tokenizer):
  from_zero = _take(train_batches(tiny_config, suite_tokenizer), 4)
  resumed = _take(train_batches(tiny_config, suite_tokenizer, start_step=2), 2)
  _assert_same(resumed[0], from_zero[2])
  _assert_same(resumed[1], from_zero[3])
  assert not np.array_equal(from_zero[0]['image'], from_zero[1]['image'])


def test_train_batches_mix_tasks_uniformly(tiny_config, suite_tokenizer):
  tiny_config.train.batch_size = 12
  ids = np.concatenate([b['task_id'] for b in _take(train_batches(tiny_config, suite_tokenizer), 3)])
  assert np.bincount(ids, minlength=12).tolist() == [3] * 12  # each block holds each task once


def test_process_slices_cover_the_global_batch(tiny_config, suite_tokenizer):
  whole = _take(train_batches(tiny_config, suite_tokenizer, start_step=1), 1)[0]
  parts = [_take(train_batches(tiny_config, suite_tokenizer, 1, i, 4), 1)[0] for i in range(4)]
  assert all(p['text'].shape[0] == 2 for p in parts)
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match='Global batch size 8 does not divide by process_count 3'):
    train_batches(tiny_config, suite_tokenizer, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='process_index 2 is not in'):
    train_batches(tiny_config, suite_tokenizer, process_index=2, process_count=2)


def test_task_selection(tiny_config, suite_tokenizer):
  tiny_config.data.tasks = ('chart_read', 'ct_lesion')
  batch = next(train_batches(tiny_config, suite_tokenizer))
  assert set(batch['task_id'].tolist()) == {task_id('chart_read'), task_id('ct_lesion')}
  tiny_config.data.tasks = ('chart_read', 'charts')
  with pytest.raises(ValueError, match="Unknown task 'charts'; valid: vqa_color"):
    train_batches(tiny_config, suite_tokenizer)


def test_worker_processes_give_the_same_batches(tiny_config, suite_tokenizer):
  in_process = _take(train_batches(tiny_config, suite_tokenizer, start_step=3), 2)
  tiny_config.data.num_workers = 2
  batches = train_batches(tiny_config, suite_tokenizer, start_step=3)
  from_workers = _take(batches, 2)
  batches.close()
  for a, b in zip(in_process, from_workers):
    _assert_same(a, b)


def test_eval_examples_are_the_fixed_eval_split(tiny_config):
  examples = eval_examples(tiny_config, 'vqa_color')
  assert len(examples) == tiny_config.data.eval_examples
  again = make_example('vqa_color', 'eval', 5, tiny_config.data.seed, 32)
  np.testing.assert_array_equal(examples[5]['image'], again['image'])


def test_eval_batches_pad_the_last_batch(tiny_config, suite_tokenizer):
  tiny_config.data.eval_examples = 21
  tiny_config.eval.batch_size = 16
  batches = list(eval_batches(tiny_config, suite_tokenizer, 'chart_read'))
  assert len(batches) == 2
  first, last = batches
  for key in BATCH_KEYS:
    assert first[key].shape == last[key].shape
  assert first['valid'].all() and last['valid'].tolist() == [True] * 5 + [False] * 11
  assert len(last['answers']) == 16
  examples = eval_examples(tiny_config, 'chart_read')
  assert first['answers'] + last['answers'][:5] == [e['answer'] for e in examples]
  assert not last['target_mask'].any()
  np.testing.assert_array_equal(last['text_len'], last['prefix_len'])


def test_eval_noise_is_deterministic_and_changes_images(tiny_config, suite_tokenizer):
  clean = next(eval_batches(tiny_config, suite_tokenizer, 'vqa_shape'))
  noisy = next(eval_batches(tiny_config, suite_tokenizer, 'vqa_shape', noise='gaussian:2'))
  again = next(eval_batches(tiny_config, suite_tokenizer, 'vqa_shape', noise='gaussian:2'))
  assert not np.array_equal(clean['image'], noisy['image'])
  np.testing.assert_array_equal(noisy['image'], again['image'])
  np.testing.assert_array_equal(clean['text'], noisy['text'])
  with pytest.raises(ValueError, match="Unknown noise 'rain'"):
    eval_batches(tiny_config, suite_tokenizer, 'vqa_shape', noise='rain:1')
  with pytest.raises(ValueError, match="Unknown task 'vqa_size'"):
    eval_batches(tiny_config, suite_tokenizer, 'vqa_size')


@pytest.mark.parametrize('task', TASK_NAMES)
def test_every_task_encodes_at_the_small_length(task, suite_tokenizer):
  for i in range(10):
    encode_example(suite_tokenizer, make_example(task, 'train', i, 0, 16), 48)


def test_unknown_source_raises(tiny_config, suite_tokenizer):
  tiny_config.data.source = 'imagenet'
  with pytest.raises(ValueError, match="Unknown data source 'imagenet'"):
    train_batches(tiny_config, suite_tokenizer)
  tiny_config.data.source = 'coco'
  with pytest.raises(ValueError, match='needs config.data.path'):
    train_batches(tiny_config, suite_tokenizer)
