"""Train a small byte-level language model on jattn and sample from it
through its KV caches.

  python examples/generation/main.py                  # about 7 min on a 2-core CPU
  python examples/generation/main.py --num_steps 50 --workdir runs/quick

The data are this Python's own standard library sources (no download).
Rerunning a command resumes from its --workdir. Prints validation bits per
byte against unigram and bigram baselines, the samples (a ragged batch
through paged caches), and decode speed with the cache against
recomputation; writes summary.json and plots.png to --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import settings as settings_lib


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the usage
    raise settings_lib.UserError(message)


def parse(argv=None) -> settings_lib.Settings:
  parser = _Parser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  for field in dataclasses.fields(settings_lib.Settings):
    help = f'{field.metadata["help"]} (default: {field.default!r})'
    if field.type == 'bool':
      parser.add_argument(
        f'--{field.name}', action=argparse.BooleanOptionalAction,
        default=field.default, help=help,
      )  # fmt: skip
    else:
      kind = {'int': int, 'float': float, 'str': str}[field.type]
      parser.add_argument(
        f'--{field.name}', type=kind, default=field.default, help=help
      )
  settings = settings_lib.Settings(**vars(parser.parse_args(argv)))
  settings_lib.check(settings)
  return settings


def main(argv=None) -> None:
  try:
    run(parse(argv))
  except settings_lib.UserError as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None


def run(settings) -> dict:
  import jax
  import numpy as np

  import figures
  import sampling
  import stdlib_bytes
  import training

  os.makedirs(settings.workdir, exist_ok=True)
  data = stdlib_bytes.splits(settings.max_files)
  for name, split in data.items():
    if split.data.size <= settings.length + 1:
      raise settings_lib.UserError(
        f'--max_files {settings.max_files} leaves the {name} split '
        f'{split.data.size} bytes; it needs more than --length ({settings.length}).'
      )
  sizes = ', '.join(
    f'{k} {v.files} files / {v.data.size} bytes' for k, v in data.items()
  )
  print(f'Python {sys.version.split()[0]} standard library: {sizes}')
  trainer, state, records = training.train(settings, data, settings.workdir)
  model = trainer.model(state['params'])
  validation = data['validation'].fixed_rows(settings.eval_rows, settings.length)
  baselines = stdlib_bytes.baselines(data['train'], validation)
  final = records[-1]['validation_bits_per_byte'] if records else float('nan')
  print(
    f'validation bits per byte: model {final:.3f}, bigram {baselines["bigram"]:.3f}, '
    f'unigram {baselines["unigram"]:.3f}'
  )
  prompts = [list(p.encode()) for p in settings.prompts.split('|')]
  key = jax.random.key(settings.seed)
  samples = sampling.paged(
    model, prompts, settings.new_tokens, key,
    settings.temperature, settings.top_k, settings.top_p,
  )  # fmt: skip
  for prompt, sample in zip(prompts, samples, strict=True):
    text = bytes(prompt) + bytes(int(b) for b in np.asarray(sample) if b != 0)
    print('---', text.decode(errors='replace'), sep='\n')
  print('---')
  measured = figures.measure(model, settings, bytes(prompts[0]))
  print(
    f'decode (greedy, batch 1): {measured["decode_bytes_per_s_cache"]:.0f} bytes/s '
    f'with the KV cache, {measured["decode_bytes_per_s_recompute"]:.0f} recomputing '
    f'(same bytes); prefill {measured["prefill_bytes_per_s"]:.0f} bytes/s; cache '
    f'{measured["cache_bytes_per_sequence"] / 2**20:.2f} MiB per sequence'
  )
  summary = {
    'settings': dataclasses.asdict(settings),
    'python': sys.version.split()[0],
    'validation_bits_per_byte': final,
    'baselines': baselines,
    'records': records,
    **measured,
  }
  with open(os.path.join(settings.workdir, 'summary.json'), 'w') as file:
    json.dump(summary, file, indent=1)
  figures.plot(
    records, baselines, measured, os.path.join(settings.workdir, 'plots.png')
  )
  outputs = 'summary.json, plots.png, metrics.jsonl, checkpoints/'
  print(f'Outputs in {settings.workdir}: {outputs}')
  return summary


if __name__ == '__main__':
  main()
