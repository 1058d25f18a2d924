"""Programmable attention: what a score_mod, a mask_mod, a block mask or sinks
cost against the built-in rule they stand for.

    python -m benchmarks.mods                  # T = 4096
    python -m benchmarks.mods --length 2048 --rounds 3

B=1, H=8, D=64, float32, causal, flash on this backend. Each line is the
median over --rounds of the ratio (this / baseline) of two calls timed back to
back (so a noisy machine slows both), with the range of the ratios:

- ALiBi as a score_mod (``jattn.mods.alibi``) vs plain causal, and vs the
  same ALiBi as a dense ``[H, T, S]`` bias;
- attention sinks vs plain causal;
- a causal mask_mod with its block mask vs ``is_causal=True``;
- 8 documents through ``jattn.mods.document_mask`` with its block mask vs
  segment ids (both causal);

forward and forward+backward; and the time to build a block mask. Writes
JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from benchmarks import timing

H, D, DOCUMENTS = 8, 64, 8


def compiled(options: dict, backward: bool):
  """Causal attention with ``options`` (arrays and mods, passed as an
  argument so nothing is constant-folded), or its gradient."""

  def attend(q, k, v, options):
    return jattn.dot_product_attention(q, k, v, is_causal=True, **options)

  fn = jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2)) if backward else attend
  fn = jax.jit(fn)
  return lambda *a: fn(*a, options)


def once(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def ratio(ours, baseline, args, rounds: int):
  """(median, low, high) of ours/baseline over back-to-back pairs, and the
  median seconds of each."""
  once(ours, args), once(baseline, args)  # compile and warm up
  pairs = [(once(ours, args), once(baseline, args)) for _ in range(rounds)]
  ratios = [a / b for a, b in pairs]
  seconds = [statistics.median(x) for x in zip(*pairs, strict=True)]
  return statistics.median(ratios), min(ratios), max(ratios), *seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=4096)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default='benchmarks/results/mods.json')
  args = parser.parse_args()
  t = args.length
  info = timing.machine()
  print(f'# {timing.describe(info)}; B=1 H={H} T={t} D={D} float32, causal')
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, t, H, D), jnp.float32) for x in keys)
  docs = jnp.asarray(np.arange(t) // (t // DOCUMENTS))[None]
  causal_mod = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
  slopes = jnp.asarray(jattn.mods.alibi_slopes(H))
  distance = (jnp.arange(t)[None, :] - jnp.arange(t)[:, None]).astype(jnp.float32)
  document_mod = jattn.mods.document_mask(docs)

  start = time.perf_counter()
  causal_blocks = jax.block_until_ready(
    jattn.create_block_mask(causal_mod, None, None, t, t)
  )
  first = time.perf_counter() - start
  start = time.perf_counter()
  document_blocks = jax.block_until_ready(
    jattn.create_block_mask(document_mod, 1, None, t, t)
  )
  build = dict(causal_first_call=first, documents=time.perf_counter() - start)
  print(
    f'create_block_mask: causal {first:.3f} s (first call, with compilation), '
    f'documents {build["documents"]:.3f} s'
  )
  comparisons = {
    'alibi score_mod vs plain': (
      dict(score_mod=jattn.mods.alibi(slopes)),
      {},
    ),
    'alibi score_mod vs alibi dense bias': (
      dict(score_mod=jattn.mods.alibi(slopes)),
      dict(bias=slopes[:, None, None] * distance[None]),
    ),
    'sinks vs plain': (dict(sinks=jnp.zeros(H)), {}),
    'causal mask_mod + block mask vs is_causal': (dict(block_mask=causal_blocks), {}),
    'documents mask_mod + block mask vs segment ids': (
      dict(block_mask=document_blocks),
      dict(q_segment_ids=docs),
    ),
  }
  results = {'create_block_mask seconds': build}
  for name, (ours, baseline) in comparisons.items():
    for backward in (False, True):
      label = f'{name}, {"fwd+bwd" if backward else "fwd"}'
      med, low, high, ours_s, base_s = ratio(
        compiled(ours, backward), compiled(baseline, backward), (q, k, v), args.rounds
      )
      results[label] = dict(
        ratio=med, low=low, high=high, seconds=ours_s, baseline=base_s
      )
      print(
        f'{label}: {med:.3f}x (range {low:.3f}-{high:.3f}; {ours_s:.3f} s vs '
        f'{base_s:.3f} s)'
      )
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(machine=info, length=t, results=results), indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
