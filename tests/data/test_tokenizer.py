"""Tokenizers: the shipped suite model and the bytes fallback."""

import pickle

import pytest

from flashmm_jax.data import tokenizer as tokenizer_lib
from flashmm_jax.data.tasks import TASK_NAMES, make_example
from flashmm_jax.data.tokenizer import BytesTokenizer, get_tokenizer

MAX_TEXT_LEN = 48
MAX_ANSWER_TOKENS = 12


def _suite_texts(n=25):
  for task in TASK_NAMES:
    for split in ('train', 'eval'):
      for i in range(n):
        ex = make_example(task, split, i, 1, 16)
        yield task, ex['prompt'], ex['answer']


def test_suite_model_is_shipped_small_with_specials(suite_tokenizer):
  assert tokenizer_lib.SUITE_MODEL.stat().st_size < 200_000
  tok = suite_tokenizer
  assert 256 < tok.vocab_size <= 1024  # byte fallback + suite pieces; fits the model head
  assert tok.pad_id == 0
  assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


@pytest.mark.parametrize('name', ['suite', 'bytes'])
def test_round_trip_on_every_task(name):
  tok = get_tokenizer(name)
  for task, prompt, answer in _suite_texts():
    for text in (prompt, answer):
      ids = tok.encode(text)
      assert all(0 <= i < tok.vocab_size for i in ids)
      assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids), (task, text)
      assert tok.decode(ids) == text, task


def test_suite_examples_fit_the_text_budget(suite_tokenizer):
  tok = suite_tokenizer
  for task, prompt, answer in _suite_texts():
    n_answer = len(tok.encode(answer))
    assert n_answer <= MAX_ANSWER_TOKENS, (task, answer)
    assert 1 + len(tok.encode(prompt)) + n_answer + 1 <= MAX_TEXT_LEN, (task, prompt)


def test_digits_are_single_tokens(suite_tokenizer):
  tok = suite_tokenizer
  pieces = [t for t in tok.encode('472') if tok.decode([t]).strip()]
  assert [tok.decode([t]) for t in pieces] == ['4', '7', '2']


@pytest.mark.parametrize('name', ['suite', 'bytes'])
def test_decode_stops_at_eos_and_skips_specials(name):
  tok = get_tokenizer(name)
  ids = tok.encode('red circle')
  noisy = [tok.bos_id] + ids + [tok.pad_id, tok.eos_id] + tok.encode('junk')
  assert tok.decode(noisy) == 'red circle'
  assert tok.decode(ids + [tok.vocab_size + 5]) == 'red circle'  # out of vocab skipped


def test_suite_tokenizer_handles_unseen_text(suite_tokenizer):
  text = 'Zebra über 42!'
  assert suite_tokenizer.decode(suite_tokenizer.encode(text)) == text


def test_bytes_tokenizer_layout():
  tok = BytesTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode('A') == [ord('A') + 3]


def test_tokenizers_pickle(suite_tokenizer):
  clone = pickle.loads(pickle.dumps(suite_tokenizer))
  assert clone.encode('what colour is the cross?') == suite_tokenizer.encode(
      'what colour is the cross?')


def test_model_path_and_errors(tmp_path, suite_tokenizer):
  copy = tmp_path / 'copy.model'
  copy.write_bytes(tokenizer_lib.SUITE_MODEL.read_bytes())
  assert get_tokenizer(str(copy)).vocab_size == suite_tokenizer.vocab_size
  with pytest.raises(ValueError, match='Tokenizer file not found: .*missing.model'):
    get_tokenizer(str(tmp_path / 'missing.model'))
  with pytest.raises(ValueError, match='empty'):
    get_tokenizer('')


def test_training_is_deterministic():
  lines = tokenizer_lib.suite_corpus(examples_per_task=20)
  assert tokenizer_lib.train_suite_model(lines) == tokenizer_lib.train_suite_model(lines)
