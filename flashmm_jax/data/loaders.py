"""Loaders for data users bring: a VQA-style JSON and COCO-captions JSON.

Both validate the JSON and check that every image file exists up front, then
read images lazily on indexing, so a large dataset costs little until used and
a grain worker only reads the images it needs. Examples have the suite's
shape: {'image', 'prompt', 'answer', 'task'} with task 'vqa' or 'caption'.
"""

import json
import pathlib

import numpy as np
from PIL import Image

from flashmm_jax.data.tasks import example

COCO_PROMPT = 'describe the image.'


def read_image(path, image_size=None, resize=False):
  """A uint8 [H, W, 3] RGB array; checked against (or resized to) image_size."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'Image file not found: {path}')
  with Image.open(path) as img:
    img = img.convert('RGB')
    if image_size is not None and img.size != (image_size, image_size):
      if not resize:
        w, h = img.size
        raise ValueError(f'{path}: image is {w}x{h}, expected {image_size}x{image_size} '
                         '(pass resize=True to resize)')
      img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


class LoadedExamples:
  """A random-access list of examples whose images are read on access."""

  def __init__(self, task, records, image_size=None, resize=False):
    self.task = task
    self.records = records  # list of (image path, prompt, answer)
    self.image_size = image_size
    self.resize = resize

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    path, prompt, answer = self.records[index]
    image = read_image(path, self.image_size, self.resize)
    return example(image, prompt, answer, self.task)


def _read_json(path):
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'JSON file not found: {path}')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: malformed JSON ({e})') from None


def _field(entry, key, path, where, kind=str):
  if not isinstance(entry, dict):
    raise ValueError(f'{path}: {where} must be an object, got {type(entry).__name__}')
  if key not in entry:
    raise ValueError(f'{path}: {where} is missing key {key!r}')
  value = entry[key]
  if not isinstance(value, kind):
    raise ValueError(f'{path}: {where} key {key!r} must be {kind.__name__}, '
                     f'got {type(value).__name__}')
  return value


def _image_path(image_dir, relative):
  full = pathlib.Path(image_dir) / relative
  if not full.is_file():
    raise FileNotFoundError(f'Image file not found: {full}')
  return str(full)


def load_vqa_json(json_path, image_size=None, image_dir=None, resize=False):
  """[{"image": "rel/path.png", "question": ..., "answer": ...}, ...] -> task 'vqa'.

  Image paths are relative to image_dir (default: the JSON file's folder).
  """
  data = _read_json(json_path)
  if not isinstance(data, list):
    raise ValueError(f'{json_path}: expected a JSON list of questions, '
                     f'got {type(data).__name__}')
  image_dir = image_dir or pathlib.Path(json_path).parent
  records = []
  for i, entry in enumerate(data):
    where = f'entry {i}'
    image = _field(entry, 'image', json_path, where)
    question = _field(entry, 'question', json_path, where)
    answer = _field(entry, 'answer', json_path, where)
    records.append((_image_path(image_dir, image), question.strip(), answer.strip()))
  return LoadedExamples('vqa', records, image_size, resize)


def load_coco_captions(json_path, image_size=None, image_dir=None, resize=False):
  """COCO captions ('images' with id/file_name, 'annotations' with image_id/caption).

  One example per annotation, in file order, with task 'caption'.
  """
  data = _read_json(json_path)
  images = _field(data, 'images', json_path, 'top level', list)
  annotations = _field(data, 'annotations', json_path, 'top level', list)
  image_dir = image_dir or pathlib.Path(json_path).parent
  files = {}
  for i, entry in enumerate(images):
    image_id = _field(entry, 'id', json_path, f'images[{i}]', int)
    files[image_id] = _field(entry, 'file_name', json_path, f'images[{i}]')
  records = []
  for i, entry in enumerate(annotations):
    where = f'annotations[{i}]'
    image_id = _field(entry, 'image_id', json_path, where, int)
    caption = _field(entry, 'caption', json_path, where)
    if image_id not in files:
      raise ValueError(f'{json_path}: {where} refers to image_id {image_id}, '
                       "which is not in 'images'")
    records.append((_image_path(image_dir, files[image_id]), COCO_PROMPT, caption.strip()))
  return LoadedExamples('caption', records, image_size, resize)


LOADERS = {'vqa_json': load_vqa_json, 'coco': load_coco_captions}
