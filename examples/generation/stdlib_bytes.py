"""The data: this Python's standard library sources, as bytes.

Every machine with Python has them, so nothing is downloaded. The files are
the ``*.py`` directly in ``sysconfig``'s stdlib directory, sorted by name;
file ``i`` is validation when ``i % 20 == 0``, test when ``i % 20 == 1``,
training otherwise. Each file ends with the ``END`` byte (no source file
holds a NUL) and is one document: training rows are windows of the
concatenated split, with segment ids so no byte attends across documents.
"""

from __future__ import annotations

import math
import os
import sysconfig

import numpy as np

END = 0  # the byte that ends a document (and a sample)


def source_files(max_files: int = 0) -> list[str]:
  folder = sysconfig.get_paths()['stdlib']
  names = sorted(n for n in os.listdir(folder) if n.endswith('.py'))
  paths = [os.path.join(folder, n) for n in names]
  return paths[:max_files] if max_files else paths


class Split:
  """One split: ``data [N]`` uint8 bytes and ``docs [N]`` int32 document ids."""

  def __init__(self, paths: list[str]):
    parts = []
    for path in paths:
      with open(path, 'rb') as file:
        parts.append(np.frombuffer(file.read() + bytes([END]), np.uint8))
    self.files = len(paths)
    self.data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    self.docs = np.repeat(
      np.arange(len(parts), dtype=np.int32), [len(p) for p in parts]
    )

  def rows(self, starts, length: int) -> dict:
    """Windows of ``length`` bytes at ``starts``: ``inputs``, the next bytes
    as ``targets``, ``segment_ids``, ``positions`` (from each document's
    first byte in the row) and ``weights`` (0 where the next byte starts
    another document)."""
    index = np.asarray(starts)[:, None] + np.arange(length)
    inputs, targets = self.data[index], self.data[index + 1]
    docs, next_docs = self.docs[index], self.docs[index + 1]
    segment_ids = docs - docs[:, :1]
    first = np.maximum.accumulate(
      np.where(np.diff(docs, prepend=-1, axis=1) != 0, np.arange(length), 0), axis=1
    )
    return {
      'inputs': inputs.astype(np.int32),
      'targets': targets.astype(np.int32),
      'segment_ids': segment_ids.astype(np.int32),
      'positions': (np.arange(length) - first).astype(np.int32),
      'weights': (docs == next_docs).astype(np.float32),
    }

  def random_rows(self, rng: np.random.Generator, batch: int, length: int) -> dict:
    return self.rows(rng.integers(0, self.data.size - length - 1, batch), length)

  def fixed_rows(self, count: int, length: int) -> dict:
    """``count`` rows evenly spread over the split (the same every time)."""
    last = self.data.size - length - 1
    return self.rows(np.linspace(0, last, count).astype(np.int64), length)


def splits(max_files: int = 0) -> dict[str, Split]:
  paths = source_files(max_files)
  which = {
    'validation': [p for i, p in enumerate(paths) if i % 20 == 0],
    'test': [p for i, p in enumerate(paths) if i % 20 == 1],
  }
  which['train'] = [p for i, p in enumerate(paths) if i % 20 > 1]
  return {name: Split(files) for name, files in which.items()}


def baselines(train: Split, rows: dict) -> dict:
  """Bits per byte of ``rows``' weighted targets under a unigram and a
  bigram model of ``train`` (add-one smoothing)."""
  counts = np.bincount(train.data, minlength=256) + 1.0
  unigram = np.log2(counts / counts.sum())
  pairs = np.ones((256, 256))
  np.add.at(pairs, (train.data[:-1], train.data[1:]), 1.0)
  bigram = np.log2(pairs / pairs.sum(axis=1, keepdims=True))
  w = rows['weights']
  score = lambda logp: float(-(logp * w).sum() / w.sum())
  return {
    'unigram': score(unigram[rows['targets']]),
    'bigram': score(bigram[rows['inputs'], rows['targets']]),
  }


def bits_per_byte(nats: float) -> float:
  return nats / math.log(2)
