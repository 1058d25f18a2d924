"""Training throughput of the example's classifier (examples/text_classification).

    python -m benchmarks.train_throughput                  # both tables
    python -m benchmarks.train_throughput --only attention --lengths 512 2048

1. ``attention``: jattn's attention against Flax's (``--attention flax``,
   ``flax.nnx.MultiHeadAttention``, same parameter layout) in the example's
   jitted ``train_step``, on full-length rows of T tokens.
2. ``layout``: the default model on the example's own ListOps batches, packed
   (several examples per row, segment ids) against one example per row
   (bucketed by length): real (non-padding) tokens per second, and the
   distinct batch shapes each compiles.

Contenders alternate for ``--rounds`` rounds, each the median of
``--repeats`` steps after a warm-up; a ratio is taken per round and its
median reported, since the machine is shared and noisy. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import timing
from benchmarks.timing import median_seconds

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), '..', 'examples', 'text_classification')
)
import batches
import config as config_lib
import listops
import steps
import vocabulary

VOCAB, CLASSES = 32, 10


class Stepper:
  """The example's jitted train step on one device, over a list of batches."""

  def __init__(self, config, batch_list):
    task, state = steps.create(config, VOCAB, CLASSES)
    self.jitted = steps.jit_steps(
      task, state, steps.make_mesh(config, jax.devices()[:1])
    )
    self.state = jax.device_put(state, self.jitted.state_sharding)
    self.batches = [jax.device_put(b, self.jitted.batch_sharding) for b in batch_list]
    self.tokens = [int(np.count_nonzero(b['segments'])) for b in batch_list]
    self.key = jax.random.key(0)
    start = time.perf_counter()
    for batch in self.batches:  # compiles every distinct shape
      self.state, metrics = self.jitted.train(self.state, batch, self.key)
    jax.block_until_ready(metrics)
    self.compile_seconds = time.perf_counter() - start
    self.shapes = len({b['tokens'].shape for b in batch_list})

  def run(self):
    """One step on each batch; blocks at the end."""
    for batch in self.batches:
      self.state, metrics = self.jitted.train(self.state, batch, self.key)
    jax.block_until_ready(metrics)

  def tokens_per_second(self, seconds) -> float:
    """Real tokens of a pass over the batches, over the median pass time."""
    return sum(self.tokens) / statistics.median(seconds)


def alternate(steppers: dict, rounds: int, repeats: int) -> dict:
  seconds = {name: [] for name in steppers}
  for _ in range(rounds):
    for name, stepper in steppers.items():
      seconds[name].append(median_seconds(stepper.run, repeats))
  return seconds


def full_rows(batch_size: int, length: int) -> dict:
  rng = np.random.default_rng(0)
  encoded = batches.Encoded(
    [rng.integers(3, VOCAB, length).astype(np.int32) for _ in range(batch_size)],
    rng.integers(0, CLASSES, batch_size).astype(np.int32),
  )
  return batches.one_per_row(encoded, length)


def attention_table(args) -> list[dict]:
  print('| T | jattn tokens/s | flax tokens/s | jattn / flax (median of rounds) |')
  print('|---|---|---|---|')
  rows = []
  for length in args.lengths:
    batch = full_rows(args.batch, length)
    steppers = {
      name: Stepper(
        config_lib.Config(
          attention=name, batch_size=args.batch, max_length=length, pack=False
        ),
        [batch],
      )
      for name in ('default', 'flax')
    }
    seconds = alternate(steppers, args.rounds, args.repeats)
    ratio = statistics.median(
      f / j for j, f in zip(seconds['default'], seconds['flax'], strict=True)
    )
    row = {
      'length': length,
      'batch': args.batch,
      'tokens_per_second': {
        name: s.tokens_per_second(seconds[name]) for name, s in steppers.items()
      },
      'ratio': ratio,
      'round_seconds': seconds,
    }
    rows.append(row)
    tps = row['tokens_per_second']
    print(
      f'| {length} | {tps["default"]:.0f} | {tps["flax"]:.0f} | {ratio:.2f}x |',
      flush=True,
    )
  return rows


def layout_table(args) -> dict:
  """Packed against bucketed rows on ListOps, as the example trains."""
  default = config_lib.Config()
  pairs = listops.generate(
    args.examples,
    min_length=default.listops_min_length,
    max_length=default.listops_max_length,
    seed=0,
  )
  texts = [text for text, _ in pairs]
  tokenizer = vocabulary.Tokenizer.build('word', texts, min_count=1, max_size=VOCAB)
  encoded = batches.Encoded(
    [tokenizer.encode(text, default.max_length) for text in texts],
    np.asarray([label for _, label in pairs], np.int32),
  )
  steppers = {}
  for pack, rows in ((True, args.packed_rows), (False, args.unpacked_rows)):
    config = dataclasses.replace(
      default, pack=pack, batch_size=rows, dropout_rate=args.dropout
    )
    layout = batches.Layout.of(config, [encoded])
    batch_list = [
      batches.make_batch(encoded, rows_, config.batch_size, layout)
      for rows_ in batches.epoch_rows(encoded.lengths, layout, rows, 0, 0)
    ][: args.batches]
    steppers['packed' if pack else 'one per row'] = Stepper(config, batch_list)
  seconds = alternate(steppers, args.rounds, args.repeats)
  result = {}
  print('| rows | batch | real tokens/s | shapes compiled | compile s |')
  print('|---|---|---|---|---|')
  for name, stepper in steppers.items():
    tps = stepper.tokens_per_second(seconds[name])
    shape = stepper.batches[0]['tokens'].shape
    result[name] = {
      'tokens_per_second': tps,
      'examples_per_step': statistics.mean(
        float(b['weights'].sum()) for b in stepper.batches
      ),
      'shapes': stepper.shapes,
      'compile_seconds': stepper.compile_seconds,
      'round_seconds': seconds[name],
    }
    print(
      f'| {name} | {shape[0]} rows, {result[name]["examples_per_step"]:.0f} examples '
      f'| {tps:.0f} | {stepper.shapes} | {stepper.compile_seconds:.0f} |',
      flush=True,
    )
  packed, unpacked = (steppers[n] for n in ('packed', 'one per row'))
  ratio = statistics.median(  # real tokens per second, per round
    (sum(packed.tokens) / p) / (sum(unpacked.tokens) / u)
    for p, u in zip(seconds['packed'], seconds['one per row'], strict=True)
  )
  print(f'packed / one per row, real tokens per second: {ratio:.2f}x')
  result['packed_over_one_per_row'] = ratio
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', choices=('attention', 'layout'))
  parser.add_argument('--lengths', type=int, nargs='+', default=[512, 128])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--examples', type=int, default=4000, help='ListOps examples')
  parser.add_argument('--packed_rows', type=int, default=16)
  parser.add_argument('--unpacked_rows', type=int, default=32)
  parser.add_argument('--batches', type=int, default=24, help='distinct batches')
  parser.add_argument('--dropout', type=float, default=config_lib.Config.dropout_rate)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=3, help='passes per round')
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
  config = config_lib.Config()
  print(
    f'model: {config.num_layers} layers, E={config.embed_dim}, H={config.num_heads}, '
    f'MLP {config.mlp_dim}; {jax.devices()[0].platform}'
  )
  print(timing.describe(timing.machine()))
  results = {'machine': timing.machine(), 'config': vars(config)}
  if args.only in (None, 'attention'):
    results['attention'] = attention_table(args)
  if args.only in (None, 'layout'):
    results['layout'] = layout_table(args)
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / 'train_throughput.json'
  path.write_text(json.dumps(results, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
