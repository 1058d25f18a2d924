"""Training throughput of the example's classifier: jattn's attention vs Flax's.

    python -m benchmarks.train_throughput                 # T = 512 (and 128)
    python -m benchmarks.train_throughput --lengths 512 2048 --batch 16

Times the example's jitted ``train_step`` (forward, backward, AdamW) of its
default model (``examples/text_classification/config.py``) on full-length
batches, once with ``--attention default`` (jattn) and once with
``--attention flax`` (``flax.nnx.MultiHeadAttention``), same weights layout
and data. The two alternate for ``--rounds`` rounds, each a median of
``--repeats`` steps after a warm-up; the ratio is taken per round and its
median reported, since the machine is shared and noisy. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import median_seconds

sys.path.insert(
  0, os.path.join(os.path.dirname(__file__), '..', 'examples', 'text_classification')
)
import config as config_lib
import train

VOCAB, CLASSES = 32, 10


def step_runner(attention: str, batch_size: int, length: int):
  """A zero-argument function that runs one blocking train step, and its
  compile time."""
  config = config_lib.Config(
    attention=attention, batch_size=batch_size, max_length=max(length, 512)
  )
  task, state = train.create(config, VOCAB, CLASSES)
  shardings, batch_sharding, train_fn, _ = train.jit_steps(
    task, state, train.make_mesh(config, jax.devices()[:1])
  )
  rng = np.random.default_rng(0)
  batch = jax.device_put(
    {
      'tokens': rng.integers(3, VOCAB, (batch_size, length)).astype(np.int32),
      'lengths': np.full(batch_size, length, np.int32),
      'labels': rng.integers(0, CLASSES, batch_size).astype(np.int32),
      'weights': np.ones(batch_size, np.float32),
    },
    batch_sharding,
  )
  holder = {'state': jax.device_put(state, shardings)}
  key = jax.random.key(0)

  def run():
    holder['state'], metrics = train_fn(holder['state'], batch, key)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  run()
  return run, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lengths', type=int, nargs='+', default=[512, 128])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
  config = config_lib.Config()
  print(
    f'model: {config.num_layers} layers, E={config.embed_dim}, H={config.num_heads}, '
    f'MLP {config.mlp_dim}; batch {args.batch}; {jax.devices()[0].platform}'
  )
  print('| T | jattn tokens/s | flax tokens/s | jattn / flax (median of rounds) |')
  print('|---|---|---|---|')
  rows = []
  for length in args.lengths:
    runners = {
      name: step_runner(name, args.batch, length) for name in ('default', 'flax')
    }
    seconds = {name: [] for name in runners}
    for _ in range(args.rounds):
      for name, (run, _) in runners.items():
        seconds[name].append(median_seconds(run, args.repeats))
    tokens = args.batch * length
    row = {
      'length': length,
      'batch': args.batch,
      'jattn_tokens_per_second': tokens / statistics.median(seconds['default']),
      'flax_tokens_per_second': tokens / statistics.median(seconds['flax']),
      'ratio': statistics.median(
        f / j for j, f in zip(seconds['default'], seconds['flax'], strict=True)
      ),
      'round_seconds': seconds,
      'compile_seconds': {name: runner[1] for name, runner in runners.items()},
    }
    rows.append(row)
    print(
      f'| {length} | {row["jattn_tokens_per_second"]:.0f} | '
      f'{row["flax_tokens_per_second"]:.0f} | {row["ratio"]:.2f}x |',
      flush=True,
    )
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / 'train_throughput.json'
  path.write_text(json.dumps({'config': vars(config), 'rows': rows}, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
