"""Sources: file loaders (happy paths and every malformed case), splits, and
Hugging Face datasets (faked)."""

import pytest

import config as config_lib
import sources
import vocabulary


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
  examples = sources.read_file(files[kind], 'text', 'label')
  assert [e.label for e in examples] == ['pos', 'neg']
  assert examples[1].text == 'bad movie'
  assert examples[1].where == f'{files[kind]}:3'  # jsonl: line 2 is blank


def test_read_file_custom_columns(tmp_path):
  path = write(tmp_path / 'b.csv', 'sentence,y\nhello there,1\n')
  assert sources.read_file(path, 'sentence', 'y')[0].label == '1'


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
  with pytest.raises(sources.DataError, match=message):
    sources.read_file(path, 'text', 'label')


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
    sources.DataError, match=rf'latin1\.{suffix}:3: not UTF-8 \(byte 0xe9'
  ):
    sources.read_file(str(path), 'text', 'label')


def test_a_field_over_the_csv_modules_limit_is_read(tmp_path):
  long_text = 'word ' * 60_000  # 300 KB, over csv's default 128 KB
  path = write(tmp_path / 'long.csv', f'text,label\n"{long_text}",pos\nshort,neg\n')
  examples = sources.read_file(path, 'text', 'label')
  assert examples[0].text == long_text and examples[1].where.endswith(':3')


def test_a_utf8_bom_and_crlf_lines_are_read(tmp_path):
  path = tmp_path / 'bom.csv'
  path.write_bytes('\ufefftext,label\r\ncafé,pos\r\n'.encode())
  (example,) = sources.read_file(str(path), 'text', 'label')
  assert (example.text, example.label) == ('café', 'pos')


def test_an_unterminated_quote_names_the_file(tmp_path):
  path = write(tmp_path / 'quote.csv', 'text,label\n"open,pos\n')
  with pytest.raises(sources.DataError, match=r'quote\.csv'):
    sources.read_file(path, 'text', 'label')


def test_missing_file(tmp_path):
  with pytest.raises(sources.DataError, match='no such file'):
    sources.read_file(str(tmp_path / 'nope.csv'), 'text', 'label')


def test_unseen_label_in_test_file_names_file_and_line(tmp_path):
  config = config_lib.Config(
    train_file=write(tmp_path / 'train.csv', 'text,label\na,x\nb,y\nc,x\nd,y\n'),
    test_file=write(tmp_path / 'test.csv', 'text,label\na,x\nb,z\n'),
    split_fraction=0.25,
  )
  splits = sources.load_splits(config)
  names = vocabulary.label_names(splits['train'])
  with pytest.raises(sources.DataError, match=r"test\.csv:3: label 'z' does not occur"):
    vocabulary.label_ids(splits['test'], names)


def test_file_splits_split_off_fractions(tmp_path):
  rows = ''.join(f'text {i},{i % 3}\n' for i in range(100))
  config = config_lib.Config(
    train_file=write(tmp_path / 't.csv', 'text,label\n' + rows), split_fraction=0.1
  )
  splits = sources.load_splits(config)
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [81, 9, 10]
  texts = [e.text for s in splits.values() for e in s]
  assert len(set(texts)) == 100  # disjoint and complete
  assert vocabulary.label_names(splits['train']) == ['0', '1', '2']


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
    sources.load_splits(config_lib.Config(dataset='imdb'))


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
  splits = sources.load_splits(
    config_lib.Config(dataset='glue/sst2', split_fraction=0.25)
  )
  assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [15, 5, 4]
  assert {e.label for e in splits['test']} == {'positive'}  # validation became test
  assert splits['train'][0].text.startswith('s')


def test_hf_dataset_unreachable_hub_is_explained(monkeypatch):
  import sys

  def unreachable(name, subset):
    raise ConnectionError('Could not reach huggingface.co')

  monkeypatch.setitem(sys.modules, 'datasets', _fake_datasets(unreachable))
  with pytest.raises(config_lib.UserError, match='Is the hub reachable'):
    sources.load_splits(config_lib.Config(dataset='imdb'))
