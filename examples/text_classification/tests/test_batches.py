"""Batches: packing, the per-epoch order, resuming mid-epoch, evaluation cover."""

import numpy as np
import pytest

import batches
import config as config_lib


def encoded(lengths, seed=0):
  rng = np.random.default_rng(seed)
  tokens = [rng.integers(3, 20, n).astype(np.int32) for n in lengths]
  return batches.Encoded(tokens, rng.integers(0, 3, len(lengths)).astype(np.int32))


def listops_like_lengths(count, seed=0):
  """Skewed like ListOps': many short examples, a long tail to 129."""
  rng = np.random.default_rng(seed)
  return np.minimum(17 + rng.exponential(28, count), 129).astype(np.int32)


def examples_in(batch):
  """Each real example of a batch as (token ids, label), by segment."""
  found = []
  for r in range(batch['tokens'].shape[0]):
    for slot in np.flatnonzero(batch['weights'][r]):
      where = batch['segments'][r] == slot + 1
      np.testing.assert_array_equal(
        batch['positions'][r, where], np.arange(where.sum())
      )
      found.append((tuple(batch['tokens'][r, where]), int(batch['labels'][r, slot])))
  return found


def test_pack_keeps_every_example_once_within_width_and_slots():
  lengths = listops_like_lengths(3000)
  rows = batches.pack(lengths, np.arange(3000), width=144, slots=5)
  flat = [i for row in rows for i in row]
  assert sorted(flat) == list(range(3000))
  assert all(sum(lengths[row]) <= 144 and len(row) <= 5 for row in rows)
  fewest = max(lengths.sum() / 144, 3000 / 5)  # no packing needs fewer rows
  assert len(rows) < 1.07 * fewest  # best-fit decreasing packs tight
  assert rows == batches.pack(lengths, np.arange(3000), width=144, slots=5)
  rows = batches.pack(lengths, np.arange(3000)[::-1], width=144, slots=8)
  assert lengths.sum() / (144 * len(rows)) > 0.95


def test_layout_from_the_data():
  config = config_lib.Config(bucket_width=16)
  layout = batches.Layout.of(config, [encoded([17, 40]), encoded([129, 30])])
  assert (layout.packed, layout.width, layout.slots) == (True, 144, 144 // 17)
  config.pack = False
  layout = batches.Layout.of(config, [encoded([17, 40]), encoded([129, 30])])
  assert (layout.packed, layout.width, layout.slots) == (False, 144, 1)
  assert layout.row_width(20) == 32


@pytest.mark.parametrize('pack', [True, False])
def test_batches_hold_the_examples_apart_and_resume_mid_epoch(pack):
  data = encoded([5, 40, 33, 7, 64, 12, 9, 70, 31, 3, 16, 22])
  config = config_lib.Config(batch_size=2, bucket_width=32, max_length=100, pack=pack)
  layout = batches.Layout.of(config, [data])
  stream = batches.train_batches(data, layout, config, start_step=0)
  first = [next(stream) for _ in range(12)]  # more than one epoch
  ids = {
    tuple(t): int(label) for t, label in zip(data.tokens, data.labels, strict=True)
  }
  for batch in first:
    width = batch['tokens'].shape[1]
    assert width % 32 == 0 and batch['labels'].shape == (2, layout.slots)
    for tokens, label in examples_in(batch):
      assert ids[tokens] == label
    assert ((batch['tokens'] > 0) == (batch['segments'] > 0)).all()
  resumed = batches.train_batches(data, layout, config, start_step=7)
  for expected in first[7:]:
    got = next(resumed)
    assert all((got[k] == expected[k]).all() for k in expected)


def test_an_epoch_is_seeded_complete_and_differs_from_the_next():
  lengths = listops_like_lengths(1000)
  layout = batches.Layout(packed=True, width=144, slots=8, bucket_width=16)
  epoch = lambda seed, n: batches.epoch_rows(lengths, layout, 16, seed, n)
  order = epoch(3, 1)
  flat = [i for rows in order for row in rows for i in row]
  assert len(set(flat)) == len(flat) > 900  # only the last partial batch is dropped
  assert order == epoch(3, 1) and order != epoch(3, 2) and order != epoch(4, 1)


def test_unpacked_batches_are_bucketed_by_length():
  lengths = listops_like_lengths(1000)
  layout = batches.Layout(packed=False, width=144, slots=1, bucket_width=16)
  order = batches.epoch_rows(lengths, layout, 16, 3, 1)
  assert all(len(rows) == 16 and all(len(r) == 1 for r in rows) for rows in order)
  spread = np.mean([np.ptp(lengths[[r[0] for r in rows]]) for rows in order])
  assert spread < 0.25 * np.ptp(lengths)  # far less than random batches'


@pytest.mark.parametrize('pack', [True, False])
def test_eval_batches_cover_every_example_once(pack):
  data = encoded([5, 40, 33, 7, 64, 3, 3])
  config = config_lib.Config(bucket_width=16, pack=pack)
  layout = batches.Layout.of(config, [data])
  found = [e for b in batches.eval_batches(data, layout, 4) for e in examples_in(b)]
  expected = [
    (tuple(t), int(label)) for t, label in zip(data.tokens, data.labels, strict=True)
  ]
  assert sorted(found) == sorted(expected)
  last = list(batches.eval_batches(data, layout, 4))[-1]
  assert last['tokens'].shape[0] == 4 and last['weights'][-1].sum() == 0


def test_a_training_split_smaller_than_a_batch_is_an_error():
  config = config_lib.Config(batch_size=8, pack=False)
  data = encoded([5, 6, 7])
  layout = batches.Layout.of(config, [data])
  with pytest.raises(batches.DataError, match='fewer than one batch'):
    next(batches.train_batches(data, layout, config, 0))
