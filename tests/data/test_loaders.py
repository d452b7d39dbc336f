"""Real-format loaders on tiny fixtures, and the pipeline reading through them."""

import json

import numpy as np
import pytest
from PIL import Image

from flashmm_jax.data import (eval_batches, eval_examples, load_coco_captions, load_vqa_json,
                              read_image, train_batches)
from flashmm_jax.data.tasks import task_id


def _write_png(path, size, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.full((size[1], size[0], 3), value, np.uint8)
  pixels[0, 0] = (255, 0, 0)
  Image.fromarray(pixels).save(path)


@pytest.fixture
def vqa_dir(tmp_path):
  entries = []
  for i in range(5):
    _write_png(tmp_path / 'imgs' / f'{i}.png', (32, 32), 20 * i)
    entries.append({'image': f'imgs/{i}.png', 'question': f'what is {i}? ',
                    'answer': str(i)})
  (tmp_path / 'vqa.json').write_text(json.dumps(entries))
  return tmp_path


@pytest.fixture
def coco_dir(tmp_path):
  images = [{'id': 10 + i, 'file_name': f'c{i}.png'} for i in range(3)]
  for i in range(3):
    _write_png(tmp_path / f'c{i}.png', (48, 40), 60 * i)
  annotations = [{'image_id': 10 + i % 3, 'caption': f'A photo number {i}.'} for i in range(6)]
  (tmp_path / 'captions.json').write_text(json.dumps({'images': images,
                                                      'annotations': annotations}))
  return tmp_path


def test_vqa_json_loads_examples(vqa_dir):
  examples = load_vqa_json(vqa_dir / 'vqa.json', image_size=32)
  assert len(examples) == 5
  ex = examples[3]
  assert ex['task'] == 'vqa' and ex['prompt'] == 'what is 3?' and ex['answer'] == '3'
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (32, 32, 3)
  assert tuple(ex['image'][0, 0]) == (255, 0, 0) and ex['image'][5, 5, 0] == 60


def test_coco_captions_one_example_per_annotation(coco_dir):
  examples = load_coco_captions(coco_dir / 'captions.json', image_size=32, resize=True)
  assert len(examples) == 6
  assert examples[4]['task'] == 'caption'
  assert examples[4]['answer'] == 'A photo number 4.'
  assert examples[4]['image'].shape == (32, 32, 3)
  np.testing.assert_array_equal(examples[1]['image'], examples[4]['image'])  # same image id


def test_wrong_image_size_names_file_and_sizes(coco_dir):
  examples = load_coco_captions(coco_dir / 'captions.json', image_size=32)
  with pytest.raises(ValueError, match=r'c0.png: image is 48x40, expected 32x32'):
    examples[0]
  assert read_image(coco_dir / 'c0.png').shape == (40, 48, 3)  # no size given: as stored


def test_missing_image_file_is_named(vqa_dir):
  (vqa_dir / 'imgs' / '2.png').unlink()
  with pytest.raises(FileNotFoundError, match=r'imgs/2.png'):
    load_vqa_json(vqa_dir / 'vqa.json')


def test_malformed_json_and_missing_keys(tmp_path, vqa_dir):
  bad = tmp_path / 'bad.json'
  bad.write_text('[{"image": ')
  with pytest.raises(ValueError, match='bad.json: malformed JSON'):
    load_vqa_json(bad)
  bad.write_text(json.dumps([{'image': 'imgs/0.png', 'question': 'q?'}]))
  with pytest.raises(ValueError, match="bad.json: entry 0 is missing key 'answer'"):
    load_vqa_json(bad, image_dir=vqa_dir)
  bad.write_text(json.dumps({'images': []}))
  with pytest.raises(ValueError, match="top level is missing key 'annotations'"):
    load_coco_captions(bad)
  bad.write_text(json.dumps({'images': [], 'annotations': [{'image_id': 3, 'caption': 'x'}]}))
  with pytest.raises(ValueError, match=r'annotations\[0\] refers to image_id 3'):
    load_coco_captions(bad)
  with pytest.raises(FileNotFoundError, match='nope.json'):
    load_vqa_json(tmp_path / 'nope.json')


def test_pipeline_reads_a_vqa_json(vqa_dir, tiny_config, suite_tokenizer):
  tiny_config.data.source = 'vqa_json'
  tiny_config.data.path = str(vqa_dir / 'vqa.json')
  tiny_config.data.eval_examples = 2
  tiny_config.train.batch_size = 4
  held_out = eval_examples(tiny_config, 'vqa')
  assert [e['answer'] for e in held_out] == ['3', '4']
  batches = [next(train_batches(tiny_config, suite_tokenizer, start_step=s)) for s in range(3)]
  assert all((b['task_id'] == task_id('vqa')).all() for b in batches)
  seen = {suite_tokenizer.decode(t[p:]) for b in batches
          for t, p in zip(b['text'], b['prefix_len'])}
  assert seen == {'0', '1', '2'}  # cycles over the training records only
  batch = next(eval_batches(tiny_config, suite_tokenizer, 'vqa'))
  assert batch['answers'][:2] == ['3', '4'] and batch['valid'].sum() == 2
  with pytest.raises(ValueError, match="only has task 'vqa', not 'caption'"):
    eval_examples(tiny_config, 'caption')
  tiny_config.data.eval_examples = 5
  with pytest.raises(ValueError, match='leave none for training'):
    eval_examples(tiny_config, 'vqa')


def test_pipeline_reads_coco_and_resizes(coco_dir, tiny_config, suite_tokenizer):
  tiny_config.data.source = 'coco'
  tiny_config.data.path = str(coco_dir / 'captions.json')
  tiny_config.data.eval_examples = 1
  batch = next(train_batches(tiny_config, suite_tokenizer))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert (batch['task_id'] == task_id('caption')).all()
