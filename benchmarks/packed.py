"""Packed documents: what block skipping buys where real training data lives.

    python -m benchmarks.packed                  # T = 8192, 8 documents of 1024
    python -m benchmarks.packed --length 4096 --rows 8

B=1, H=8, D=64, float32, causal within each document. Four comparisons, each
measured in one run (medians of --repeats after a warm-up):

1. forward: jattn with segment ids against PyTorch ``flex_attention``
   (``torch.compile``d, with a document ``create_block_mask``), when the
   ``bench`` extra is installed; and against jattn's plain causal call;
2. forward+backward: segment ids against the plain causal call (1/8 of its
   blocks are visible);
3. --rows rows of different random document layouts in one call, against
   the same rows one call at a time (skipping is per row, not the union);
4. a block-diagonal dense ``mask`` against the same layout as segment ids.

Writes JSON to --out.
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

H, D, DOCUMENTS = 8, 64, 8


def compiled(backward: bool):
  """jattn's causal attention given a dict of extra arrays, or its gradient."""

  def attend(q, k, v, arrays):
    return jattn.dot_product_attention(q, k, v, is_causal=True, **arrays)

  if backward:
    return jax.jit(jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2)))
  return jax.jit(attend)


def seconds(fn, args, repeats: int) -> float:
  run = lambda: jax.block_until_ready(fn(*args))
  run()
  return timing.median_seconds(run, repeats)


def random_layout(length: int, seed: int) -> np.ndarray:
  """``[T]`` ids of DOCUMENTS documents cut at random places."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, length), DOCUMENTS - 1, replace=False))
  return np.searchsorted(cuts, np.arange(length), side='right')


def flex_seconds(length: int, ids: np.ndarray, repeats: int) -> float | None:
  """PyTorch flex_attention's forward with a document block mask."""
  try:
    import torch
    from torch.nn.attention import flex_attention as flex
  except ImportError:
    return None
  document = torch.as_tensor(ids)

  def document_causal(b, h, q_idx, kv_idx):
    return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

  block_mask = flex.create_block_mask(
    document_causal, None, None, length, length, device='cpu'
  )
  attend = torch.compile(flex.flex_attention)
  q, k, v = (torch.randn(1, H, length, D) for _ in range(3))
  with torch.no_grad():
    return seconds(lambda: attend(q, k, v, block_mask=block_mask), (), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--rows', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='benchmarks/results/packed.json')
  args = parser.parse_args()
  t, repeats = args.length, args.repeats
  info = timing.machine()
  print(f'# {timing.describe(info)}; B=1 H={H} T={t} D={D} float32, causal')
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, t, H, D), jnp.float32) for x in keys)
  ids = np.arange(t) // (t // DOCUMENTS)
  segments = dict(q_segment_ids=jnp.asarray(ids)[None])
  block_diagonal = dict(mask=jnp.asarray(ids[:, None] == ids[None, :]))
  results = {}

  def time(name, arrays, backward):
    results[name] = seconds(compiled(backward), (q, k, v, arrays), repeats)
    return results[name]

  packed = time('packed fwd', segments, False)
  causal = time('causal fwd', {}, False)
  flex = flex_seconds(t, ids, repeats)
  results['flex_attention fwd'] = flex
  print(f'forward: packed {packed:.3f} s, plain causal {causal:.3f} s', end=' ')
  print(f'({causal / packed:.1f}x)')
  if flex is not None:
    print(
      f'  torch flex_attention {flex:.3f} s: jattn is {flex / packed:.2f}x its speed'
    )
  packed_b = time('packed fwd+bwd', segments, True)
  causal_b = time('causal fwd+bwd', {}, True)
  print(
    f'fwd+bwd: packed {packed_b:.3f} s, plain causal {causal_b:.3f} s '
    f'({causal_b / packed_b:.1f}x)'
  )
  mask_b = time('block-diagonal mask fwd+bwd', block_diagonal, True)
  print(f'fwd+bwd: block-diagonal mask {mask_b:.3f} s', end=' ')
  print(f'({mask_b / packed_b:.2f}x segment ids)')

  layouts = np.stack([random_layout(t, seed) for seed in range(args.rows)])
  big = [jnp.broadcast_to(x, (args.rows,) + x.shape[1:]) for x in (q, k, v)]
  for backward in (False, True):
    name = 'fwd+bwd' if backward else 'fwd'
    fn = compiled(backward)
    together = seconds(fn, (*big, dict(q_segment_ids=jnp.asarray(layouts))), repeats)
    alone = sum(
      seconds(fn, (q, k, v, dict(q_segment_ids=jnp.asarray(row)[None])), repeats)
      for row in layouts
    )
    results[f'{args.rows} layouts {name}: together'] = together
    results[f'{args.rows} layouts {name}: one at a time'] = alone
    print(
      f'{args.rows} layouts {name}: together {together:.3f} s, one at a time '
      f'{alone:.3f} s ({together / alone:.2f}x)'
    )
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(machine=info, length=t, seconds=results), indent=1))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
