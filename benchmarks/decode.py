"""Decoding: one new token per sequence against a long cache.

    python -m benchmarks.decode            # the figures of docs/inference.md
    python -m benchmarks.decode --rounds 5

1. attention alone, B=8, T=1, S=4096, H=8, K=2, D=64, float32:
   ``jattn.dot_product_attention`` on ``[B, S, K, D]`` arrays (its automatic
   choice: the decode kernel) and ``jattn.cache.attend`` on a dense cache
   (stored head-major ``[B, K, S, D]``) against
   ``jax.nn.dot_product_attention`` and PyTorch SDPA (``enable_gqa=True``,
   on its own ``[B, K, S, D]`` layout, when torch is installed), and the
   cache's bytes read per second against a plain ``jnp.sum`` over arrays of
   the cache's size (the machine's memory bound);
2. a whole decode step of ``jattn.nnx.MultiHeadAttention`` (H=K=8, E=512,
   cache 4096, B=8) against ``flax.nnx.MultiHeadAttention`` with the same
   weights, both under ``nnx.jit``: tokens per second;
3. the pure step (``jattn.cache.multi_head_attention_step``) on a paged
   cache (pages of 256, the pool's pages permuted in the table) against the
   dense one.

Each ratio is the median over --rounds of two calls timed back to back,
with their range. Appends the run to the JSON at --out (every run on the
same machine is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jattn
from benchmarks import timing
from jattn import cache as kv

# PyTorch's OpenMP threads otherwise spin after each call, taking the cores
# from the JAX call timed next to it.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

B, S, H, K, D, E = 8, 4096, 8, 2, 64, 512


def once(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def paired(fns: dict, rounds: int) -> dict:
  """Median seconds of each of ``fns`` (no-argument callables), timed in
  turn in every round after a warm-up."""
  for fn in fns.values():
    once(fn), once(fn)
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(once(fn))
  return times


def ratio(times, a, b):
  """(median, low, high) of a's time over b's, round by round."""
  ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
  return statistics.median(ratios), min(ratios), max(ratios)


def bare_einsum(q, k, v, chunks: int = 8):
  """What XLA's CPU code reaches on the head-major cache with nothing
  else: ``q [B, 1, H, D]``, ``k, v [B, K, S, D]``, S cut into ``chunks`` as
  a batch axis of one contraction, merged by log-sum-exp. A ceiling, not a
  kernel (no masks, offsets or lengths)."""
  batch, num_kv, kv_len, dim = k.shape
  rows = q.reshape(batch, num_kv, -1, dim) * dim**-0.5  # [B, K, G, D]
  k = k.reshape(batch, num_kv, chunks, kv_len // chunks, dim)
  v = v.reshape(k.shape)
  logits = jnp.einsum('bkgd,bkcsd->bkcgs', rows, k)
  m = logits.max(-1)
  p = jnp.exp(logits - m[..., None])
  out = jnp.einsum('bkcgs,bkcsd->bkcgd', p, v)
  weight = jnp.exp(m - m.max(2, keepdims=True))  # [B, K, C, G]
  total = (p.sum(-1) * weight).sum(2)
  out = (out * weight[..., None]).sum(2) / total[..., None]
  return out.reshape(q.shape)


def attention_alone(rounds: int, results: dict):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, 1, H, D))
  k = jax.random.normal(keys[1], (B, S, K, D))
  v = jax.random.normal(keys[2], (B, S, K, D))
  position = jnp.full((B,), S - 1)
  ours = jax.jit(
    lambda q, k, v: jattn.dot_product_attention(
      q, k, v, is_causal=True, q_offsets=position, key_value_seq_lengths=position + 1
    )
  )
  peer = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
  reduction = jax.jit(lambda k, v: k.sum() + v.sum())
  stored = kv.KVCache(
    jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), jnp.full((B,), S, jnp.int32)
  )
  through_cache = jax.jit(lambda q, cache: kv.attend(q, cache, position))
  ceiling = jax.jit(bare_einsum)
  same = ceiling(q, stored.key, stored.value) - through_cache(q, stored)
  assert float(jnp.abs(same).max()) < 1e-4, 'the ceiling computes other values'
  fns = {
    'jattn': lambda: ours(q, k, v),
    'jattn cache': lambda: through_cache(q, stored),
    'bare einsum (no masks, S in 8 chunks)': lambda: ceiling(
      q, stored.key, stored.value
    ),
    'jax.nn': lambda: peer(q, k, v),
    'jnp.sum over the cache': lambda: reduction(k, v),
  }
  try:
    import torch

    tq, tk, tv = (torch.randn(B, h, t, D) for h, t in ((H, 1), (K, S), (K, S)))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fns['torch SDPA'] = lambda: sdpa(tq, tk, tv, enable_gqa=True)
  except ImportError:
    pass
  times = paired(fns, rounds)
  cache_bytes = k.nbytes + v.nbytes
  print(
    f'1. attention, B={B} T=1 S={S} H={H} K={K} D={D} float32 '
    f'(cache {cache_bytes >> 20} MiB)'
  )
  for name in fns:
    seconds = statistics.median(times[name])
    line = f'   {name}: {seconds * 1e3:.2f} ms, {cache_bytes / seconds / 1e9:.1f} GB/s'
    ratios = {}
    for ours_name in ('jattn', 'jattn cache'):
      if name not in ('jattn', 'jattn cache'):
        med, low, high = ratio(times, name, ours_name)
        line += f'; {ours_name} {med:.2f}x its speed (range {low:.2f}-{high:.2f})'
        ratios[ours_name] = dict(ratio=med, low=low, high=high)
    print(line)
    results[f'attention: {name}'] = dict(
      seconds=seconds, gb_per_s=cache_bytes / seconds / 1e9, **ratios
    )


def whole_step(rounds: int, results: dict):
  params = jattn.init_params(jax.random.key(1), E, H)
  ours = jattn.nnx.MultiHeadAttention.from_params(params)
  theirs = nnx.MultiHeadAttention(H, E, qkv_features=E, decode=True, rngs=nnx.Rngs(0))
  for name, projection in params.items():
    for leaf, array in projection.items():
      getattr(getattr(theirs, name), leaf)[...] = array
  for module in (ours, theirs):
    module.init_cache((B, S, E))
  ours.cache_lengths[...] = jnp.full((B,), S - 96, jnp.int32)
  theirs.cache_index[...] = jnp.array(S - 96, jnp.int32)
  token = jax.random.normal(jax.random.key(2), (B, 1, E))
  step = nnx.jit(lambda module, x: module(x, decode=True))
  fns = {
    'jattn.nnx': lambda: step(ours, token),
    'flax.nnx': lambda: step(theirs, token),
  }
  times = paired(fns, rounds)
  med, low, high = ratio(times, 'flax.nnx', 'jattn.nnx')
  ours_s, theirs_s = (statistics.median(times[n]) for n in fns)
  print(
    f'2. nnx decode step (H=K={H}, E={E}, cache {S}, B={B}): jattn '
    f'{B / ours_s:.0f} tokens/s, Flax {B / theirs_s:.0f} tokens/s: {med:.2f}x '
    f'(range {low:.2f}-{high:.2f})'
  )
  results['nnx step'] = dict(jattn=ours_s, flax=theirs_s, ratio=med, low=low, high=high)


def paged_step(rounds: int, results: dict):
  params = jattn.init_params(jax.random.key(3), E, H, num_kv_heads=K)
  page = 256
  dense = kv.init_cache(params, B, S)
  paged = kv.init_paged_cache(params, B, B * S // page, page, S // page)
  paged, _ = kv.allocate_pages(paged, S - 96, jnp.ones(B * S // page, bool))
  permuted = jax.random.permutation(jax.random.key(5), B * S // page)
  paged = dataclasses.replace(paged, page_table=permuted[paged.page_table])
  fill = jnp.full((B,), S - 96, jnp.int32)
  dense = kv.KVCache(dense.key, dense.value, fill)
  paged = kv.PagedKVCache(paged.key_pages, paged.value_pages, paged.page_table, fill)
  token = jax.random.normal(jax.random.key(4), (B, 1, E))
  step = jax.jit(kv.multi_head_attention_step)  # no donation: timed repeatedly
  fns = {
    'dense': lambda: step(params, token, dense),
    'paged': lambda: step(params, token, paged),
  }
  times = paired(fns, rounds)
  med, low, high = ratio(times, 'paged', 'dense')
  dense_s = statistics.median(times['dense'])
  print(
    f'3. pure step, GQA K={K}: paged (pages of {page}) {med:.2f}x the time of '
    f'dense (range {low:.2f}-{high:.2f}; dense {dense_s * 1e3:.2f} ms)'
  )
  results['paged vs dense'] = dict(ratio=med, low=low, high=high, dense=dense_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--out', default='benchmarks/results/decode.json')
  args = parser.parse_args()
  info = timing.machine()
  print(f'# {timing.describe(info)}')
  results = {}
  attention_alone(args.rounds, results)
  whole_step(args.rounds, results)
  paged_step(args.rounds, results)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Every run is kept (docs/inference.md quotes the stored runs' range); a run on
  # another machine starts the file anew.
  runs = []
  if out.exists():
    stored = json.loads(out.read_text())
    if stored.get('machine') == info:
      runs = stored.get('runs', [])
  runs.append(dict(date=time.strftime('%Y-%m-%d %H:%M'), results=results))
  out.write_text(json.dumps(dict(machine=info, runs=runs), indent=1))
  print(f'wrote {out} ({len(runs)} runs)')


if __name__ == '__main__':
  main()
