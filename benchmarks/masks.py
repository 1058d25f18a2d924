"""Block skipping by mask kind: flash forward+backward under each visibility
rule, against full attention and against ``jax.nn`` given the same mask.

    python -m benchmarks.masks               # T = S = 8192, B=1 H=8 D=64
    python -m benchmarks.masks --length 4096

Each rule leaves a fraction of the [T, S] logits visible; flash should take
time in proportion to the blocks it visits. ``jax.nn`` gets the rule as a
dense boolean mask (it has no chunk or prefix option), so it does the full
work whatever the rule. Times are medians of --repeats runs after a warm-up,
compile time apart; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from benchmarks import timing
from jattn import testing

B, H, D = 1, 8, 64


def rules(t: int) -> dict[str, tuple[dict, np.ndarray]]:
  """Name -> (jattn options, the same rule as a dense [T, S] mask)."""
  rows, cols = np.arange(t)[:, None], np.arange(t)[None, :]
  causal = rows >= cols
  chunk, prefix, window = t // 8, t // 4, t // 16
  documents = np.arange(t) // chunk  # 8 packed documents
  same_document = documents[:, None] == documents[None, :]
  return {
    'full': ({}, np.ones((t, t), bool)),
    'causal': (dict(is_causal=True), causal),
    f'chunked causal (C={chunk})': (
      dict(is_causal=True, attention_chunk_size=chunk),
      causal & (rows // chunk == cols // chunk),
    ),
    f'prefix-LM (P={prefix})': (
      dict(is_causal=True, prefix_lengths=jnp.array([prefix])),
      causal | (cols < prefix),
    ),
    f'sliding window ({window}, 0)': (
      dict(is_causal=True, local_window_size=(window, 0)),
      causal & (rows - cols <= window),
    ),
    f'packed documents (8 x {chunk}), causal': (
      dict(is_causal=True, q_segment_ids=jnp.asarray(documents)[None]),
      causal & same_document,
    ),
    f'block-diagonal mask (8 x {chunk}), causal': (
      dict(is_causal=True, mask=jnp.asarray(same_document)),
      causal & same_document,
    ),
  }


def measure(fn, args, repeats: int) -> float:
  compiled = testing.compiled_gradient(fn, *args)
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  return timing.median_seconds(run, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  t = args.length
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (B, t, H, D), jnp.float32) for key in keys)
  results = {}
  full_seconds = None
  print(f'fwd+bwd, B={B} H={H} T=S={t} D={D}, float32, median of {args.repeats}')
  for name, (options, mask) in rules(t).items():
    ours = measure(
      lambda q, k, v, o=options: jattn.dot_product_attention(q, k, v, **o),
      (q, k, v),
      args.repeats,
    )
    dense = jnp.asarray(mask)
    peer = measure(
      lambda q, k, v, m=dense: jax.nn.dot_product_attention(q, k, v, mask=m),
      (q, k, v),
      args.repeats,
    )
    full_seconds = full_seconds or ours
    results[name] = {
      'visible_fraction': float(mask.mean()),
      'jattn_seconds': ours,
      'jax_nn_seconds': peer,
      'jattn_vs_full': ours / full_seconds,
      'speedup_vs_jax_nn': peer / ours,
    }
    print(
      f'{name:28s} visible {mask.mean():5.1%}  jattn {ours:6.2f} s '
      f'({ours / full_seconds:4.2f} of full)  jax.nn {peer:6.2f} s  '
      f'jattn {peer / ours:4.1f}x faster'
    )
  path = args.out / f'masks_{t}.json'
  path.write_text(json.dumps({'machine': timing.machine(), **results}, indent=1))
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
