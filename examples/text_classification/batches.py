"""Batches: a split as token ids, laid out in rows, in a seeded order per epoch.

Every batch, for training and evaluation, packed or not, is one dict:

  tokens    [R, W] int32    token ids; 0 where no example is
  segments  [R, W] int32    1..N: which example of its row a token is part of; 0: none
  positions [R, W] int32    a token's position in its example ([CLS] is 0)
  labels    [R, N] int32    each example slot's label
  weights   [R, N] float32  1 for a real example, 0 for an empty slot

R rows of W tokens, each with up to N examples. Packed (the default), a row
holds as many whole examples as fit (best-fit decreasing), so hardly a token
is padding and every batch has the same shape; attention keeps the examples
apart by their segment ids. Unpacked, a row holds one example and rows of
similar length are batched together, padded to a multiple of ``bucket_width``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from sources import DataError, Example
from vocabulary import Tokenizer, label_ids


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


def encode(
  examples: Sequence[Example], tokenizer: Tokenizer, names, max_length: int
) -> Encoded:
  return Encoded(
    [tokenizer.encode(e.text, max_length) for e in examples], label_ids(examples, names)
  )


def round_up(length: int, multiple: int) -> int:
  return multiple * math.ceil(length / multiple)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How examples become rows: packed into rows of ``width`` tokens with at
  most ``slots`` examples each, or one per row, widths rounded up to
  ``bucket_width``."""

  packed: bool
  width: int  # packed: of every row; unpacked: of the widest
  slots: int
  bucket_width: int

  @classmethod
  def of(cls, config, splits: Sequence[Encoded]) -> Layout:
    """The layout for ``splits``: rows as wide as their longest example."""
    lengths = np.concatenate([split.lengths for split in splits])
    width = round_up(int(lengths.max()), config.bucket_width)
    slots = width // int(lengths.min()) if config.pack else 1
    return cls(config.pack, width, slots, config.bucket_width)

  def __str__(self) -> str:
    if self.packed:
      return f'packed rows of {self.width} tokens, up to {self.slots} examples each'
    return f'one example per row, rows of up to {self.width} tokens'

  def row_width(self, longest: int) -> int:
    return self.width if self.packed else round_up(longest, self.bucket_width)


def pack(lengths: np.ndarray, order: np.ndarray, width: int, slots: int) -> list:
  """Rows of example indices, best-fit decreasing: longest first, each example
  goes to the open row it leaves least room in (``order`` breaks ties).

  Each row's lengths add up to at most ``width``, with at most ``slots``.
  """
  order = order[np.argsort(-lengths[order], kind='stable')]
  by_room = [[] for _ in range(width + 1)]  # open rows by free tokens
  open_count = np.zeros(width + 1, np.int64)
  rows: list[list[int]] = []
  for index in order:
    length = int(lengths[index])
    fits = np.flatnonzero(open_count[length:])
    if len(fits):
      room = length + int(fits[0])
      row = by_room[room].pop()
      open_count[room] -= 1
    else:
      room, row = width, len(rows)
      rows.append([])
    rows[row].append(int(index))
    room -= length
    if room and len(rows[row]) < slots:
      by_room[room].append(row)
      open_count[room] += 1
  return rows


def make_batch(data: Encoded, rows: Sequence[Sequence[int]], num_rows: int, layout):
  """The batch dict (module docstring) of ``rows`` of example indices;
  rows past ``len(rows)`` are empty (for the last evaluation batch)."""
  longest = max(sum(len(data.tokens[i]) for i in row) for row in rows)
  width, slots = layout.row_width(longest), layout.slots
  batch = {
    'tokens': np.zeros((num_rows, width), np.int32),
    'segments': np.zeros((num_rows, width), np.int32),
    'positions': np.zeros((num_rows, width), np.int32),
    'labels': np.zeros((num_rows, slots), np.int32),
    'weights': np.zeros((num_rows, slots), np.float32),
  }
  for r, row in enumerate(rows):
    start = 0
    for slot, i in enumerate(row):
      ids = data.tokens[i]
      span = slice(start, start + len(ids))
      batch['tokens'][r, span] = ids
      batch['segments'][r, span] = slot + 1
      batch['positions'][r, span] = np.arange(len(ids))
      batch['labels'][r, slot] = data.labels[i]
      batch['weights'][r, slot] = 1.0
      start += len(ids)
  return batch


def epoch_rows(lengths: np.ndarray, layout: Layout, batch_size: int, seed, epoch):
  """One epoch's batches, each a list of rows of example indices.

  Packed: the epoch's examples packed into rows, the rows shuffled. Unpacked:
  each pool of 64 batches' worth of shuffled examples sorted by length and cut
  into batches (similar lengths, little padding), the batches shuffled. A pure
  function of (seed, epoch), so a resumed run sees the same order. The last
  incomplete batch is dropped.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  if layout.packed:
    rows = pack(lengths, order, layout.width, layout.slots)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return [
      rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)
    ]
  pool = 64 * batch_size
  batches = []
  for start in range(0, len(order), pool):
    chunk = order[start : start + pool]
    chunk = chunk[np.argsort(lengths[chunk], kind='stable')]
    batches += [
      [[i] for i in chunk[b : b + batch_size]]
      for b in range(0, len(chunk) - batch_size + 1, batch_size)
    ]
  return [batches[i] for i in rng.permutation(len(batches))]


def train_batches(
  data: Encoded, layout: Layout, config, start_step: int
) -> Iterator[dict]:
  """Training batches from global step ``start_step`` on, epoch after epoch."""
  lengths = data.lengths
  epoch, skip = 0, start_step
  while True:
    batches = epoch_rows(lengths, layout, config.batch_size, config.seed, epoch)
    if not batches:
      raise DataError(
        f'the training split ({len(data)} examples) fills fewer than one batch '
        f'(--batch_size {config.batch_size} rows).'
      )
    for rows in batches[skip:]:
      yield make_batch(data, rows, config.batch_size, layout)
    epoch, skip = epoch + 1, max(0, skip - len(batches))


def eval_batches(data: Encoded, layout: Layout, batch_size: int) -> Iterator[dict]:
  """Every example once, in a fixed order; the last batch padded with empty rows."""
  lengths = data.lengths
  if layout.packed:
    rows = pack(lengths, np.arange(len(data)), layout.width, layout.slots)
  else:
    rows = [[i] for i in np.argsort(lengths, kind='stable')]
  for start in range(0, len(rows), batch_size):
    yield make_batch(data, rows[start : start + batch_size], batch_size, layout)


def one_per_row(data: Encoded, width: int) -> dict:
  """Every example of ``data`` in a row of its own, ``width`` tokens wide."""
  layout = Layout(packed=False, width=width, slots=1, bucket_width=width)
  return make_batch(data, [[i] for i in range(len(data))], len(data), layout)


def one_example(ids: np.ndarray) -> dict:
  """A batch of one row holding the example ``ids`` (label 0), for predictions."""
  return one_per_row(Encoded([ids], np.zeros(1, np.int32)), len(ids))
