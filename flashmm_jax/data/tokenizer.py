"""Tokenizers: the shipped SentencePiece model of the suite, and raw UTF-8 bytes.

Both share one small interface: vocab_size, pad_id (always 0, the batch
contract pads with 0), bos_id, eos_id, encode(str) -> ids without specials,
and decode(ids) -> str, which stops at eos, skips pad and bos, and skips ids
outside the vocabulary (a model's head may be wider than the tokenizer).

Retrain the shipped model (deterministic) with
  python -m flashmm_jax.data.tokenizer --train
"""

import argparse
import io
import os
import pathlib

import sentencepiece as spm

ASSETS = pathlib.Path(__file__).parent / 'assets'
SUITE_MODEL = ASSETS / 'suite.model'

# Training corpus: prompts and answers of this many examples per task and split.
TRAIN_EXAMPLES_PER_TASK = 600
# 256 byte-fallback pieces + ~250 merges: enough that every suite word is one
# or two pieces (the longest example is ~26 tokens, well inside 48). BPE, since
# unigram prunes this repetitive corpus to sub-word fragments.
TRAIN_VOCAB_SIZE = 512
MODEL_TYPE = 'bpe'


class SentencePieceTokenizer:
  """A SentencePiece model with pad=0 and bos/eos defined; picklable for workers."""

  def __init__(self, model_proto, source='<memory>'):
    self._proto = model_proto
    self._source = source
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    if self.pad_id != 0 or self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f'Tokenizer {source}: needs pad_id=0 and bos/eos defined, got '
                       f'pad={self.pad_id} bos={self.bos_id} eos={self.eos_id}')

  @classmethod
  def from_file(cls, path):
    path = pathlib.Path(path)
    if not path.is_file():
      raise ValueError(f"Tokenizer file not found: {path} (use 'suite', 'bytes' "
                       'or a path to a SentencePiece .model file)')
    return cls(path.read_bytes(), source=str(path))

  def __getstate__(self):
    return {'proto': self._proto, 'source': self._source}

  def __setstate__(self, state):
    self.__init__(state['proto'], state['source'])

  def encode(self, text):
    return self._sp.encode(text)

  def decode(self, ids):
    return self._sp.decode(_content_ids(ids, self))


class BytesTokenizer:
  """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text):
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids):
    data = bytes(i - self.offset for i in _content_ids(ids, self))
    return data.decode('utf-8', errors='replace')


def _content_ids(ids, tok):
  """Ids up to the first eos, without pad, bos or out-of-vocabulary ids."""
  out = []
  for i in (int(i) for i in ids):
    if i == tok.eos_id:
      break
    if i not in (tok.pad_id, tok.bos_id) and 0 <= i < tok.vocab_size:
      out.append(i)
  return out


def get_tokenizer(name):
  """'suite' (shipped model), 'bytes', or a path to a SentencePiece .model file."""
  if name == 'bytes':
    return BytesTokenizer()
  if name == 'suite':
    return SentencePieceTokenizer.from_file(SUITE_MODEL)
  if not name:
    raise ValueError("Tokenizer name is empty; use 'suite', 'bytes' or a .model path")
  return SentencePieceTokenizer.from_file(name)


def suite_corpus(examples_per_task=TRAIN_EXAMPLES_PER_TASK, seed=0):
  """Prompt and answer lines from every task and both splits, in a fixed order."""
  from flashmm_jax.data.tasks import TASK_NAMES, make_example
  lines = []
  for task in TASK_NAMES:
    for split in ('train', 'eval'):
      for index in range(examples_per_task):
        ex = make_example(task, split, index, seed, image_size=32)
        lines += [ex['prompt'], ex['answer']]
  return lines


def train_suite_model(lines, vocab_size=TRAIN_VOCAB_SIZE):
  """Serialized SentencePiece model; single-threaded so the bytes are reproducible."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      model_type=MODEL_TYPE, vocab_size=vocab_size, hard_vocab_limit=False,
      character_coverage=1.0, split_digits=True,
      # Unknown characters (user text) fall back to bytes instead of <unk>.
      byte_fallback=True,
      # Identity normalisation keeps decode(encode(s)) == s for suite text.
      normalization_rule_name='identity',
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      num_threads=1, shuffle_input_sentence=False, minloglevel=2)
  return model.getvalue()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train', action='store_true', help='train and write the suite model')
  parser.add_argument('--output', default=str(SUITE_MODEL))
  args = parser.parse_args(argv)
  if not args.train:
    parser.error('nothing to do; pass --train')
  proto = train_suite_model(suite_corpus())
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  pathlib.Path(args.output).write_bytes(proto)
  tok = SentencePieceTokenizer(proto)
  print(f'wrote {args.output}: vocab_size={tok.vocab_size}, {len(proto)} bytes')


if __name__ == '__main__':
  main()
