"""Loaders (happy paths and every malformed case), tokenizers, batching."""

import json

import numpy as np
import pytest

import config as config_lib
import data


def write(path, text):
  path.write_text(text, encoding='utf-8')
  return str(path)


@pytest.fixture
def files(tmp_path):
  return {
    'csv': write(tmp_path / 'a.csv', 'text,label\n"good, fine",pos\nbad movie,neg\n'),
    'tsv': write(tmp_path / 'a.tsv', 'label\ttext\npos\tgood fine\nneg\tbad movie\n'),
    'jsonl': write(
      tmp_path / 'a.jsonl',
      '{"text": "good fine", "label": "pos"}\n\n'
      '{"text": "bad movie", "label": "neg"}\n',
    ),
  }


@pytest.mark.parametrize('kind', ['csv', 'tsv', 'jsonl'])
def test_read_file_happy_path(files, kind):
  examples = data.read_file(files[kind], 'text', 'label')
  assert [e.label for e in examples] == ['pos', 'neg']
  assert examples[1].text == 'bad movie'
  assert examples[1].where == f'{files[kind]}:3'  # jsonl: line 2 is blank


def test_read_file_custom_columns(tmp_path):
  path = write(tmp_path / 'b.csv', 'sentence,y\nhello there,1\n')
  assert data.read_file(path, 'sentence', 'y')[0].label == '1'


@pytest.mark.parametrize(
  'name, contents, message',
  [
    ('bad.csv', 'text,label\nfine,pos\nno label here\n', r'bad\.csv:3: 1 fields'),
    ('bad.tsv', 'text\tlabel\nfine\tpos\na\tb\tc\n', r'bad\.tsv:3: 3 fields'),
    (
      'bad.jsonl',
      '{"text": "a", "label": "x"}\n{"text": "b",\n',
      r'bad\.jsonl:2: not valid JSON',
    ),
    ('list.jsonl', '[1, 2]\n', r'list\.jsonl:1: expected a JSON object'),
    ('col.csv', 'body,label\nfine,pos\n', r"col\.csv:2: no column 'text'"),
    ('col.jsonl', '{"text": "a"}\n', r"col\.jsonl:1: no column 'label'"),
    ('empty.csv', 'text,label\n', r'empty\.csv: no examples'),
    ('blank.csv', 'text,label\n ,pos\n', r"blank\.csv:2: empty or non-text 'text'"),
    (
      'nolabel.jsonl',
      '{"text": "a", "label": null}\n',
      r'nolabel\.jsonl:1: missing label',
    ),
    ('data.xml', '<a/>', r'data\.xml: unknown file type'),
  ],
)
def test_read_file_malformed(tmp_path, name, contents, message):
  path = write(tmp_path / name, contents)
  with pytest.raises(data.DataError, match=message):
    data.read_file(path, 'text', 'label')


@pytest.mark.parametrize('suffix', ['csv', 'tsv', 'jsonl'])
def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, suffix):
  rows = {
    'csv': [b'text,label', b'fine,pos', b'caf\xe9,neg'],
    'tsv': [b'text\tlabel', b'fine\tpos', b'caf\xe9\tneg'],
    'jsonl': [
      b'{"text": "a", "label": "x"}',
      b'',
      b'{"text": "caf\xe9", "label": "y"}',
    ],
  }[suffix]
  path = tmp_path / f'latin1.{suffix}'
  path.write_bytes(b'\n'.join(rows) + b'\n')
  with pytest.raises(
    data.DataError, match=rf'latin1\.{suffix}:3: not UTF-8 \(byte 0xe9'
  ):
    data.read_file(str(path), 'text', 'label')


def test_a_field_over_the_csv_modules_limit_is_read(tmp_path):
  long_text = 'word ' * 60_000  # 300 KB, over csv's default 128 KB
  path = write(tmp_path / 'long.csv', f'text,label\n"{long_text}",pos\nshort,neg\n')
  examples = data.read_file(path, 'text', 'label')
  assert examples[0].text == long_text and examples[1].where.endswith(':3')


def test_a_utf8_bom_and_crlf_lines_are_read(tmp_path):
  path = tmp_path / 'bom.csv'
  path.write_bytes('\ufefftext,label\r\ncafé,pos\r\n'.encode())
  (example,) = data.read_file(str(path), 'text', 'label')
  assert (example.text, example.label) == ('café', 'pos')


def test_an_unterminated_quote_names_the_file(tmp_path):
  path = write(tmp_path / 'quote.csv', 'text,label\n"open,pos\n')
  with pytest.raises(data.DataError, match=r'quote\.csv'):
    data.read_file(path, 'text', 'label')


def test_missing_file(tmp_path):
  with pytest.raises(data.DataError, match='no such file'):
    data.read_file(str(tmp_path / 'nope.csv'), 'text', 'label')


def test_unseen_label_in_test_file_names_file_and_line(tmp_path):
  config = config_lib.Config(
    train_file=write(tmp_path / 'train.csv', 'text,label\na,x\nb,y\nc,x\nd,y\n'),
    test_file=write(tmp_path / 'test.csv', 'text,label\na,x\nb,z\n'),
    split_fraction=0.25,
  )
  splits = data.load_splits(config)
  names = data.label_names(splits['train'])
  with pytest.raises(data.DataError, match=r"test\.csv:3: label 'z' does not occur"):
    data.label_ids(splits['test'], names)


def test_file_splits_split_off_fractions(tmp_path):
  rows = ''.join(f'text {i},{i % 3}\n' for i in range(100))
  config = config_lib.Config(
    train_file=write(tmp_path / 't.csv', 'text,label\n' + rows), split_fraction=0.1
  )
  splits = data.load_splits(config)
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [81, 9, 10]
  texts = [e.text for s in splits.values() for e in s]
  assert len(set(texts)) == 100  # disjoint and complete
  assert data.label_names(splits['train']) == ['0', '1', '2']


def test_hf_dataset_without_the_extra_says_how_to_install(monkeypatch):
  import builtins

  real_import = builtins.__import__

  def no_datasets(name, *args, **kwargs):
    if name == 'datasets':
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_datasets)
  with pytest.raises(
    config_lib.UserError, match=r"pip install -e '\.\[examples,datasets\]'"
  ):
    data.load_splits(config_lib.Config(dataset='imdb'))


def test_word_tokenizer_vocabulary_and_round_trip(tmp_path):
  texts = ['the cat sat', 'the dog sat', 'the end']
  tokenizer = data.Tokenizer.build('word', texts, min_count=2, max_size=100)
  assert tokenizer.vocabulary == [data.PAD, data.UNK, data.CLS, 'the', 'sat']
  ids = tokenizer.encode('the cat sat on', max_length=4)
  assert tokenizer.decode(ids) == [data.CLS, 'the', data.UNK, 'sat']
  capped = data.Tokenizer.build('word', texts, min_count=1, max_size=4)
  assert capped.size == 4 and capped.vocabulary[3] == 'the'
  path = str(tmp_path / 'vocab.json')
  tokenizer.save(path)
  assert data.Tokenizer.load(path).vocabulary == tokenizer.vocabulary
  with open(path) as file:
    assert json.load(file)['kind'] == 'word'


def test_byte_tokenizer():
  tokenizer = data.Tokenizer.build('byte', [], min_count=1, max_size=0)
  ids = tokenizer.encode('hé!', max_length=10)
  assert tokenizer.size == 259
  assert len(ids) == 1 + len('hé!'.encode()) and ids.max() < tokenizer.size
  assert tokenizer.decode(tokenizer.encode('hi', 10)) == [data.CLS, 'h', 'i']


def _encoded(lengths, seed=0):
  rng = np.random.default_rng(seed)
  tokens = [rng.integers(3, 20, n).astype(np.int32) for n in lengths]
  return data.Encoded(tokens, rng.integers(0, 3, len(lengths)).astype(np.int32))


def test_epoch_order_is_deterministic_bucketed_and_complete():
  lengths = np.random.default_rng(0).integers(2, 130, 1000)
  order = data.epoch_order(lengths, 16, seed=3, epoch=1, pool=8)
  assert all(len(b) == 16 for b in order) and len(order) == 1000 // 16
  flat = np.concatenate(order)
  assert len(set(flat.tolist())) == len(flat)
  again = data.epoch_order(lengths, 16, seed=3, epoch=1, pool=8)
  assert all((a == b).all() for a, b in zip(order, again, strict=True))
  other = data.epoch_order(lengths, 16, seed=3, epoch=2, pool=8)
  assert any((a != b).any() for a, b in zip(order, other, strict=True))
  # Bucketing: a batch's lengths spread far less than random batches' do.
  spread = np.mean([np.ptp(lengths[b]) for b in order])
  assert spread < 0.25 * np.ptp(lengths)


def test_batches_pad_to_bucket_and_resume_mid_epoch():
  encoded = _encoded([5, 40, 33, 7, 64, 12, 9, 70, 31, 3])
  config = config_lib.Config(batch_size=2, bucket_width=32, max_length=100)
  stream = data.train_batches(encoded, config, start_step=0)
  first = [next(stream) for _ in range(8)]  # more than one epoch (5 batches)
  for batch in first:
    width = batch['tokens'].shape[1]
    assert width % 32 == 0 and width - 32 < batch['lengths'].max() <= width
    for row, n in enumerate(batch['lengths']):
      assert (batch['tokens'][row, n:] == 0).all() and (
        batch['tokens'][row, :n] > 0
      ).all()
  resumed = data.train_batches(encoded, config, start_step=6)
  for expected in first[6:]:
    got = next(resumed)
    assert all((got[k] == expected[k]).all() for k in expected)


def test_eval_batches_cover_every_example_once():
  encoded = _encoded([5, 40, 33, 7, 64])
  config = config_lib.Config(eval_batch_size=2, bucket_width=16, max_length=100)
  batches = list(data.eval_batches(encoded, config))
  assert [b['weights'].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
  assert sorted(
    int(n)
    for b in batches
    for n, w in zip(b['lengths'], b['weights'], strict=True)
    if w
  ) == [5, 7, 33, 40, 64]


class _Split(list):
  """Rows with ``features``, like a ``datasets.Dataset``."""

  def __init__(self, rows, features):
    super().__init__(rows)
    self.features = features


def _fake_datasets(load_dataset):
  import types

  return types.SimpleNamespace(load_dataset=load_dataset)


def test_hf_dataset_glue_style(monkeypatch):
  import sys
  import types

  features = {
    'sentence': types.SimpleNamespace(dtype='string'),
    'label': types.SimpleNamespace(names=['negative', 'positive']),
  }
  rows = lambda n, label: [{'sentence': f's{i}', 'label': label(i)} for i in range(n)]
  loaded = {
    'train': _Split(rows(20, lambda i: i % 2), features),
    'validation': _Split(rows(4, lambda i: 1), features),
    'test': _Split(rows(4, lambda i: -1), features),  # hidden labels
  }
  monkeypatch.setitem(sys.modules, 'datasets', _fake_datasets(lambda name, sub: loaded))
  splits = data.load_splits(config_lib.Config(dataset='glue/sst2', split_fraction=0.25))
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [15, 5, 4]
  assert {e.label for e in splits['test']} == {'positive'}  # validation became test
  assert splits['train'][0].text.startswith('s')


def test_hf_dataset_unreachable_hub_is_explained(monkeypatch):
  import sys

  def unreachable(name, subset):
    raise ConnectionError('Could not reach huggingface.co')

  monkeypatch.setitem(sys.modules, 'datasets', _fake_datasets(unreachable))
  with pytest.raises(config_lib.UserError, match='Is the hub reachable'):
    data.load_splits(config_lib.Config(dataset='imdb'))
