"""Data sources: ListOps, local CSV/TSV/JSONL files, Hugging Face datasets.

Every source yields splits of ``Example(text, label, where)``, ``where`` being
``file:line`` for errors (``vocabulary`` turns them into ids, ``batches``
into batches).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

import listops
from config import UserError


class DataError(UserError):
  """Bad input data; the message starts with ``file:line``."""


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  label: str
  where: str  # 'file:line' (or 'listops:index') for error messages


Splits = dict[str, list[Example]]  # 'train', 'validation', 'test'


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
    raise UserError(f'--split_fraction must lie in (0, 1); got {fraction}.')
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
