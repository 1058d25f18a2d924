"""A/B: this checkout's flash against a baseline git revision, in one process.

    python -m benchmarks.ab --baseline main~3
    python -m benchmarks.ab --baseline v0.1.0 --lengths 2048 8192

The baseline's ``jattn/`` is extracted with ``git archive`` into a temporary
directory as the package ``jattn_baseline``, so both run side by side. For
full and causal attention (B=1, H=8, D=64, float32) and each length, the two
are timed alternately, forward and forward+backward, medians of --repeats
rounds; a ratio above 1 means this checkout is slower. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import jattn
from benchmarks import timing

B, H, D = 1, 8, 64
_ROOT = Path(__file__).resolve().parent.parent


def load_baseline(revision: str, into: Path):
  """``jattn`` at ``revision`` as the module ``jattn_baseline``."""
  archive = subprocess.run(
    ['git', 'archive', revision, 'jattn'], cwd=_ROOT, check=True, capture_output=True
  ).stdout
  subprocess.run(['tar', '-x', '-C', str(into)], input=archive, check=True)
  package = into / 'jattn_baseline'
  (into / 'jattn').rename(package)
  for path in package.rglob('*.py'):
    text = re.sub(r'\bjattn\b(?=[ .\n])', 'jattn_baseline', path.read_text())
    path.write_text(text)
  sys.path.insert(0, str(into))
  return importlib.import_module('jattn_baseline')


def rounds(functions, args, repeats: int) -> list[float]:
  """Median seconds of each function, timed in alternation."""
  times = [[] for _ in functions]
  for f in functions:
    jax.block_until_ready(f(*args))
  for _ in range(repeats):
    for f, seconds in zip(functions, times, strict=True):
      seconds.append(
        timing.median_seconds(lambda f=f: jax.block_until_ready(f(*args)), 1)
      )
  return [sorted(s)[len(s) // 2] for s in times]


def timed_call(module, causal: bool, backward: bool):
  """``module``'s flash attention (or its gradient in q, k, v), jitted."""

  def attend(q, k, v):
    return module.dot_product_attention(
      q, k, v, is_causal=causal, implementation='flash'
    )

  if backward:
    return jax.jit(jax.grad(lambda *qkv: attend(*qkv).sum(), argnums=(0, 1, 2)))
  return jax.jit(attend)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--baseline', required=True, help='git revision to compare with')
  parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 8192])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--out', default='benchmarks/results/ab.json')
  args = parser.parse_args()
  info = timing.machine()
  print(f'# {timing.describe(info)}; baseline {args.baseline}')
  print('| T | rule | pass | this (s) | baseline (s) | this / baseline |')
  print('|---|---|---|---|---|---|')
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    baseline = load_baseline(args.baseline, Path(directory))
    for length in args.lengths:
      keys = jax.random.split(jax.random.key(0), 3)
      q, k, v = (jax.random.normal(x, (B, length, H, D), jnp.float32) for x in keys)
      for causal in (False, True):
        for backward in (False, True):
          functions = [timed_call(m, causal, backward) for m in (jattn, baseline)]
          this, base = rounds(functions, (q, k, v), args.repeats)
          rule = 'causal' if causal else 'full'
          name = 'fwd+bwd' if backward else 'fwd'
          ratio = this / base
          print(
            f'| {length} | {rule} | {name} | {this:.3f} | {base:.3f} | {ratio:.2f} |'
          )
          rows.append(
            dict(length=length, rule=rule, backward=backward, this=this, baseline=base)
          )
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(dict(machine=info, baseline=args.baseline, rows=rows), indent=1)
  )


if __name__ == '__main__':
  main()
