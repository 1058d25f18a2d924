"""Data: sources (ListOps, local files, Hugging Face), tokenizers, batches.

Every source yields splits of ``Example(text, label, where)``, ``where`` being
``file:line`` for errors. Tokenizers turn text into ids with ``[CLS]`` first;
``batches`` groups examples of similar length so padding stays small.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

import listops
from config import UserError

PAD, UNK, CLS = '[PAD]', '[UNK]', '[CLS]'


class DataError(UserError):
  """Bad input data; the message starts with ``file:line``."""


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  label: str
  where: str  # 'file:line' (or 'listops:index') for error messages


Splits = dict[str, list[Example]]  # 'train', 'validation', 'test'


# ---------------------------------------------------------------- sources


def listops_splits(config) -> Splits:
  """ListOps train/validation/test, each from its own seed derived from ``seed``."""
  splits = {}
  for index, (name, count) in enumerate(
    (
      ('train', config.train_size),
      ('validation', config.val_size),
      ('test', config.test_size),
    )
  ):
    pairs = listops.generate(
      count,
      min_length=config.listops_min_length,
      max_length=config.listops_max_length,
      seed=config.seed * 3 + index,
    )
    splits[name] = [
      Example(text, str(label), f'listops-{name}:{i}')
      for i, (text, label) in enumerate(pairs)
    ]
  return splits


def _text_lines(path: str, raw) -> Iterator[str]:
  """The lines of a binary file as text; a byte that is not UTF-8 -> file:line."""
  for line_number, line in enumerate(raw, 1):
    try:
      yield line.decode('utf-8-sig' if line_number == 1 else 'utf-8')
    except UnicodeDecodeError as error:
      raise DataError(
        f'{path}:{line_number}: not UTF-8 (byte 0x{line[error.start]:02x} at column '
        f'{error.start + 1}); save the file as UTF-8.'
      ) from None


# A text field may be a whole document: lift the csv module's 128 KB limit.
csv.field_size_limit(2**31 - 1)


def _rows(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, row) pairs of a .csv, .tsv or .jsonl file."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in ('.csv', '.tsv', '.jsonl', '.json'):
    raise DataError(f'{path}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl.')
  with open(path, 'rb') as raw:
    file = _text_lines(path, raw)
    if suffix in ('.jsonl', '.json'):
      for line_number, line in enumerate(file, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as error:
          raise DataError(
            f'{path}:{line_number}: not valid JSON ({error.msg}).'
          ) from None
        if not isinstance(row, dict):
          raise DataError(f'{path}:{line_number}: expected a JSON object per line.')
        yield line_number, row
      return
    reader = csv.reader(file, delimiter='\t' if suffix == '.tsv' else ',')
    try:
      yield from _csv_rows(path, reader)
    except csv.Error as error:
      raise DataError(f'{path}:{reader.line_num}: malformed CSV ({error}).') from None


def _csv_rows(path: str, reader) -> Iterator[tuple[int, dict]]:
  header = next(reader, None)
  if header is None:
    return
  for row in reader:
    line_number = reader.line_num
    if not row or row == ['']:
      continue
    if len(row) != len(header):
      raise DataError(
        f'{path}:{line_number}: {len(row)} fields, the header has {len(header)} '
        f'({", ".join(header)}).'
      )
    yield line_number, dict(zip(header, row, strict=True))


def read_file(path: str, text_column: str, label_column: str) -> list[Example]:
  """Examples of a local CSV, TSV or JSONL file with a text and a label column."""
  if not os.path.exists(path):
    raise DataError(f'{path}: no such file.')
  examples = []
  for line_number, row in _rows(path):
    for column in (text_column, label_column):
      if column not in row:
        raise DataError(
          f'{path}:{line_number}: no column {column!r}; the columns are '
          f'{sorted(row)}. Set --text_column / --label_column.'
        )
    text, label = row[text_column], row[label_column]
    if not isinstance(text, str) or not text.strip():
      raise DataError(f'{path}:{line_number}: empty or non-text {text_column!r}.')
    if isinstance(label, (dict, list)) or label is None or str(label).strip() == '':
      raise DataError(f'{path}:{line_number}: missing label in {label_column!r}.')
    examples.append(Example(text, str(label).strip(), f'{path}:{line_number}'))
  if not examples:
    raise DataError(f'{path}: no examples (the split is empty).')
  return examples


def split_off(examples: list[Example], fraction: float, seed: int):
  """(rest, held out): a random ``fraction`` of ``examples`` held out."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'split fraction must lie in (0, 1); got {fraction}.')
  order = np.random.default_rng(seed).permutation(len(examples))
  held = max(1, round(len(examples) * fraction))
  if held >= len(examples):
    raise DataError(f'{examples[0].where}: too few examples to hold {fraction} out.')
  return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def file_splits(config) -> Splits:
  """Train from ``train_file``; validation and test from files or split off."""
  read = lambda path: read_file(path, config.text_column, config.label_column)
  train = read(config.train_file)
  if config.test_file:
    test = read(config.test_file)
  else:
    train, test = split_off(train, config.split_fraction, config.seed)
  if config.val_file:
    validation = read(config.val_file)
  else:
    train, validation = split_off(train, config.split_fraction, config.seed + 1)
  return {'train': train, 'validation': validation, 'test': test}


def hf_splits(config) -> Splits:
  """A Hugging Face dataset by name: 'imdb', 'ag_news', 'glue/sst2', ..."""
  try:
    import datasets
  except ImportError:
    raise UserError(
      f'--dataset {config.dataset} needs Hugging Face datasets: '
      "pip install -e '.[examples,datasets]'"
    ) from None
  name, _, subset = config.dataset.partition('/')
  try:
    loaded = datasets.load_dataset(name, subset or None)
  except Exception as error:  # the hub is unreachable, or the name is unknown
    first_line = (str(error).splitlines() or [type(error).__name__])[0]
    raise UserError(
      f'could not load Hugging Face dataset {config.dataset!r} ({first_line}). '
      'Is the hub reachable (or the dataset cached)? Offline, use --train_file.'
    ) from None
  features = loaded['train'].features
  text_column = config.text_column
  if text_column not in features:  # e.g. sst2's 'sentence': the first text column
    strings = [c for c, f in features.items() if getattr(f, 'dtype', '') == 'string']
    text_column = strings[0] if strings else text_column
  for column in (text_column, config.label_column):
    if column not in features:
      raise DataError(
        f'{config.dataset}: no column {column!r}; the columns are {sorted(features)}.'
        ' Set --text_column / --label_column.'
      )
  names = getattr(features[config.label_column], 'names', None)
  # ClassLabel ids become their names; -1 (a hidden test label) stays '-1'.
  label = lambda i: names[i] if names and i >= 0 else str(i)

  def convert(split, rows):
    return [
      Example(
        row[text_column],
        label(row[config.label_column]),
        f'{config.dataset}[{split}]:{i}',
      )
      for i, row in enumerate(rows)
    ]

  splits = {split: convert(split, rows) for split, rows in loaded.items()}
  train = splits['train']
  validation = splits.get('validation')
  test = splits.get('test')
  # GLUE's test labels are hidden (-1): use validation as the test split.
  if test is not None and any(e.label == '-1' for e in test[:100]):
    test = None
  if test is None:
    if validation is None:
      train, test = split_off(train, config.split_fraction, config.seed)
    else:
      test, validation = validation, None
  if validation is None:
    train, validation = split_off(train, config.split_fraction, config.seed + 1)
  return {'train': train, 'validation': validation, 'test': test}


def load_splits(config) -> Splits:
  """The splits named by ``config``: ListOps, local files or Hugging Face."""
  if config.train_file:
    splits = file_splits(config)
  elif config.dataset == 'listops':
    splits = listops_splits(config)
  else:
    splits = hf_splits(config)
  for name, examples in splits.items():
    if not examples:
      raise DataError(
        f'{config.train_file or config.dataset}: the {name} split is empty.'
      )
  return splits


# ---------------------------------------------------------------- labels and tokens


def label_names(train: Sequence[Example]) -> list[str]:
  """Sorted label names of the training split (numbers in numeric order)."""
  names = {e.label for e in train}
  numeric = all(n.lstrip('-').isdigit() for n in names)
  return sorted(names, key=int if numeric else str)


def label_ids(examples: Sequence[Example], names: Sequence[str]) -> np.ndarray:
  """``[N]`` int32 label ids; a label unseen in training names its file:line."""
  index = {name: i for i, name in enumerate(names)}
  ids = np.empty(len(examples), np.int32)
  for i, example in enumerate(examples):
    if example.label not in index:
      raise DataError(
        f'{example.where}: label {example.label!r} does not occur in the '
        f'training split (labels: {", ".join(names)}).'
      )
    ids[i] = index[example.label]
  return ids


class Tokenizer:
  """Text to ids with ``[CLS]`` first; ``kind`` 'word' (a vocabulary built from
  the training split) or 'byte' (UTF-8 bytes, as LRA's Text task)."""

  def __init__(self, kind: str, vocabulary: Sequence[str] = ()):
    if kind not in ('word', 'byte'):
      raise ValueError(f"tokenizer must be 'word' or 'byte'; got {kind!r}.")
    self.kind = kind
    self.vocabulary = [PAD, UNK, CLS] + (
      [] if kind == 'byte' else [t for t in vocabulary if t not in (PAD, UNK, CLS)]
    )
    self._ids = {token: i for i, token in enumerate(self.vocabulary)}

  @classmethod
  def build(cls, kind: str, texts: Sequence[str], *, min_count: int, max_size: int):
    if kind == 'byte':
      return cls('byte')
    counts = collections.Counter(token for text in texts for token in text.split())
    ranked = sorted(
      (t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t)
    )
    return cls('word', ranked[: max(0, max_size - 3)])

  @property
  def size(self) -> int:
    return 256 + 3 if self.kind == 'byte' else len(self.vocabulary)

  def encode(self, text: str, max_length: int) -> np.ndarray:
    """``[<= max_length]`` int32 ids: [CLS] and the first tokens of ``text``."""
    if self.kind == 'byte':
      ids = [b + 3 for b in text.encode('utf-8')[: max_length - 1]]
    else:
      unk = self._ids[UNK]
      ids = [self._ids.get(t, unk) for t in text.split()[: max_length - 1]]
    return np.asarray([self._ids[CLS], *ids], np.int32)

  def decode(self, ids: Sequence[int]) -> list[str]:
    """Token strings of ``ids`` (for plots)."""
    if self.kind == 'byte':
      return [self.vocabulary[i] if i < 3 else chr(i - 3) for i in ids]
    return [self.vocabulary[i] for i in ids]

  def save(self, path: str) -> None:
    with open(path, 'w') as file:
      json.dump({'kind': self.kind, 'vocabulary': self.vocabulary}, file)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    with open(path) as file:
      saved = json.load(file)
    return cls(saved['kind'], saved['vocabulary'])


VOCABULARY_FILE, LABELS_FILE = 'vocab.json', 'labels.json'


def save_vocabulary(workdir: str, tokenizer: Tokenizer, names: Sequence[str]) -> None:
  """The tokenizer and label names, beside the run's checkpoints."""
  tokenizer.save(os.path.join(workdir, VOCABULARY_FILE))
  with open(os.path.join(workdir, LABELS_FILE), 'w') as file:
    json.dump(list(names), file)


def load_vocabulary(workdir: str) -> tuple[Tokenizer, list[str]] | None:
  """(tokenizer, label names) saved in ``workdir``, or None if it has none."""
  paths = [os.path.join(workdir, name) for name in (VOCABULARY_FILE, LABELS_FILE)]
  if not all(os.path.exists(path) for path in paths):
    return None
  with open(paths[1]) as file:
    return Tokenizer.load(paths[0]), json.load(file)


# ---------------------------------------------------------------- batches


@dataclasses.dataclass
class Encoded:
  """A split as token ids: ``tokens[i]`` is ``[L_i]``; ``labels`` is ``[N]``."""

  tokens: list[np.ndarray]
  labels: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(t) for t in self.tokens), np.int32, len(self.tokens))

  def __len__(self) -> int:
    return len(self.tokens)


def encode(examples, tokenizer: Tokenizer, names, max_length: int) -> Encoded:
  return Encoded(
    [tokenizer.encode(e.text, max_length) for e in examples], label_ids(examples, names)
  )


def padded_length(length: int, bucket_width: int, max_length: int) -> int:
  """``length`` rounded up to a multiple of ``bucket_width`` (at most
  ``max_length`` rounded up likewise): few distinct shapes, little padding."""
  return min(
    bucket_width * math.ceil(length / bucket_width),
    bucket_width * math.ceil(max_length / bucket_width),
  )


def make_batch(
  data: Encoded, indices, batch_size: int, bucket_width: int, max_length: int
):
  """A batch dict: tokens ``[B, T]``, lengths ``[B]``, labels ``[B]``, weights ``[B]``.

  Rows past ``len(indices)`` are padding with weight 0 (for the last eval batch).
  """
  lengths = [len(data.tokens[i]) for i in indices]
  width = padded_length(max(lengths), bucket_width, max_length)
  tokens = np.zeros((batch_size, width), np.int32)
  batch_lengths = np.zeros(batch_size, np.int32)
  labels = np.zeros(batch_size, np.int32)
  weights = np.zeros(batch_size, np.float32)
  for row, i in enumerate(indices):
    tokens[row, : lengths[row]] = data.tokens[i]
    batch_lengths[row] = lengths[row]
    labels[row] = data.labels[i]
    weights[row] = 1.0
  return {
    'tokens': tokens,
    'lengths': batch_lengths,
    'labels': labels,
    'weights': weights,
  }


def epoch_order(
  lengths: np.ndarray, batch_size: int, seed: int, epoch: int, pool: int = 64
):
  """One epoch's batches of indices: shuffled, bucketed by length, shuffled again.

  Each pool of ``pool * batch_size`` shuffled examples is sorted by length and
  cut into batches, so a batch holds similar lengths; the batches' order is then
  shuffled. A pure function of (seed, epoch): a resumed run sees the same order.
  Drops the last incomplete batch.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  batches = []
  for start in range(0, len(order), pool * batch_size):
    chunk = order[start : start + pool * batch_size]
    chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
    batches += [
      chunk[i : i + batch_size]
      for i in range(0, len(chunk) - batch_size + 1, batch_size)
    ]
  return [batches[i] for i in rng.permutation(len(batches))]


def train_batches(data: Encoded, config, start_step: int) -> Iterator[dict]:
  """Training batches from global step ``start_step`` on, forever (epoch by epoch)."""
  lengths = data.lengths
  per_epoch = len(data) // config.batch_size
  if per_epoch == 0:
    raise DataError(
      f'the training split has {len(data)} examples, fewer than one batch '
      f'(--batch_size {config.batch_size}).'
    )
  epoch, skip = divmod(start_step, per_epoch)
  while True:
    for indices in epoch_order(lengths, config.batch_size, config.seed, epoch)[skip:]:
      yield make_batch(
        data, indices, config.batch_size, config.bucket_width, config.max_length
      )
    epoch, skip = epoch + 1, 0


def eval_batches(data: Encoded, config) -> Iterator[dict]:
  """Every example once, sorted by length; the last batch padded with weight 0."""
  order = np.argsort(data.lengths, kind='stable')
  size = config.eval_batch_size
  for start in range(0, len(order), size):
    yield make_batch(
      data, order[start : start + size], size, config.bucket_width, config.max_length
    )
