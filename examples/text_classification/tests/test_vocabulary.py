"""Tokenizers: word vocabularies, bytes, saving and loading."""

import json

import vocabulary


def test_word_tokenizer_vocabulary_and_round_trip(tmp_path):
  texts = ['the cat sat', 'the dog sat', 'the end']
  tokenizer = vocabulary.Tokenizer.build('word', texts, min_count=2, max_size=100)
  assert tokenizer.vocabulary == [
    vocabulary.PAD,
    vocabulary.UNK,
    vocabulary.CLS,
    'the',
    'sat',
  ]
  ids = tokenizer.encode('the cat sat on', max_length=4)
  assert tokenizer.decode(ids) == [vocabulary.CLS, 'the', vocabulary.UNK, 'sat']
  capped = vocabulary.Tokenizer.build('word', texts, min_count=1, max_size=4)
  assert capped.size == 4 and capped.vocabulary[3] == 'the'
  path = str(tmp_path / 'vocab.json')
  tokenizer.save(path)
  assert vocabulary.Tokenizer.load(path).vocabulary == tokenizer.vocabulary
  with open(path) as file:
    assert json.load(file)['kind'] == 'word'


def test_byte_tokenizer():
  tokenizer = vocabulary.Tokenizer.build('byte', [], min_count=1, max_size=0)
  ids = tokenizer.encode('hé!', max_length=10)
  assert tokenizer.size == 259
  assert len(ids) == 1 + len('hé!'.encode()) and ids.max() < tokenizer.size
  assert tokenizer.decode(tokenizer.encode('hi', 10)) == [vocabulary.CLS, 'h', 'i']
