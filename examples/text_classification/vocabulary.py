"""Text to ids and labels to ids: the tokenizers and the label names of a run.

A run's tokenizer and label names come from its training split and are saved
in its workdir (``vocab.json``, ``labels.json``), so that resuming and
predicting read the same ones.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence

import numpy as np

from sources import DataError, Example

PAD, UNK, CLS = '[PAD]', '[UNK]', '[CLS]'


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


def save(workdir: str, tokenizer: Tokenizer, names: Sequence[str]) -> None:
  """The tokenizer and label names, beside the run's checkpoints."""
  tokenizer.save(os.path.join(workdir, VOCABULARY_FILE))
  with open(os.path.join(workdir, LABELS_FILE), 'w') as file:
    json.dump(list(names), file)


def load(workdir: str) -> tuple[Tokenizer, list[str]] | None:
  """(tokenizer, label names) saved in ``workdir``, or None if it has none."""
  paths = [os.path.join(workdir, name) for name in (VOCABULARY_FILE, LABELS_FILE)]
  if not all(os.path.exists(path) for path in paths):
    return None
  with open(paths[1]) as file:
    return Tokenizer.load(paths[0]), json.load(file)
