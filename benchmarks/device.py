"""The device check: which kernel each call gets on this backend, whether it
equals the reference, and how fast it runs against the alternatives.

    python -m benchmarks.device              # on whatever backend JAX has
    python -m benchmarks.device --size small # the CPU default (interpret mode)

For each call of ``CALLS`` (bfloat16, B=2, H=8, K=2, D=128): the kernel the
automatic choice picks and why the ones before it refused; the largest error
of every kernel that takes the call against ``'reference'`` in float32; and
forward and forward+backward times (median of --repeats) of the automatic
choice, ``'flash'``, ``'splash'`` and ``'cudnn'`` where they take it, with
their ratio to flash measured in the same run. On a CPU splash runs in
Pallas interpret mode: its times there say nothing about a TPU. Writes the
table to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import jattn
from benchmarks import timing
from jattn import _prepare, _registry

SIZES = {'small': 256, 'large': 4096}
B, H, K, D = 2, 8, 2, 128


def calls(length: int) -> dict:
  """The calls checked: the rules a model uses, one kernel path each."""
  docs = jnp.stack([jnp.arange(length) * 4 // length] * B)
  return {
    'plain': {},
    'causal': dict(is_causal=True),
    'causal, sliding window': dict(is_causal=True, local_window_size=(length // 4, 0)),
    'packed documents': dict(is_causal=True, q_segment_ids=docs),
    'lengths, soft-cap, sinks': dict(
      key_value_seq_lengths=jnp.array([length, length // 3]),
      logits_soft_cap=30.0,
      sinks=jnp.zeros(H),
    ),
    'prefix-LM': dict(is_causal=True, prefix_lengths=jnp.array([length // 8, 0])),
    'dense mask': dict(mask=jnp.tril(jnp.ones((length, length), bool))),
  }


def inputs(length: int, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  return (
    jax.random.normal(keys[0], (B, length, H, D), dtype),
    jax.random.normal(keys[1], (B, length, K, D), dtype),
    jax.random.normal(keys[2], (B, length, K, D), dtype),
  )


def seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def check(name: str, options: dict, length: int, repeats: int) -> dict:
  q, k, v = inputs(length, jnp.bfloat16)
  p = _prepare.prepare_arguments(query=q, key=k, value=v, **options)
  chosen = _registry.select(p)
  reasons = {n: kernel.supports(p) for n, kernel in _registry.KERNELS.items()}
  row = {
    'call': name,
    'auto': chosen.name,
    'refused': {n: r for n, r in reasons.items() if r},
  }

  def attend(implementation):
    return jax.jit(
      lambda q, k, v: jattn.dot_product_attention(
        q, k, v, implementation=implementation, **options
      )
    )

  def loss(implementation):
    return jax.jit(
      jax.grad(
        lambda q, k, v: (
          jattn.dot_product_attention(q, k, v, implementation=implementation, **options)
          .astype(jnp.float32)
          .sum()
        ),
        argnums=(0, 1, 2),
      )
    )

  exact = [x.astype(jnp.float32) for x in (q, k, v)]
  expected = attend('reference')(*exact)
  row['max error vs reference (float32)'] = {
    n: float(jnp.max(jnp.abs(attend(n)(*exact) - expected)))
    for n, r in reasons.items()
    if not r and n not in ('reference', 'decode')
  }
  timed = {'auto': None} | {
    n: n for n in ('flash', 'splash', 'cudnn') if not reasons[n]
  }
  times = {}
  for label, implementation in timed.items():
    times[label] = {
      'forward s': seconds(attend(implementation), (q, k, v), repeats),
      'forward+backward s': seconds(loss(implementation), (q, k, v), repeats),
    }
  for t in times.values():
    t['forward vs flash'] = times['flash']['forward s'] / t['forward s']
    t['forward+backward vs flash'] = (
      times['flash']['forward+backward s'] / t['forward+backward s']
    )
  row['times'] = times
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = 'small' if jax.default_backend() == 'cpu' else 'large'
  parser.add_argument('--size', choices=sorted(SIZES), default=default)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--out', default=f'benchmarks/results/device_{jax.default_backend()}.json'
  )
  args = parser.parse_args()
  length = SIZES[args.size]
  info = timing.machine()
  info['devices'] = [d.device_kind for d in jax.devices()]
  shape = f'B={B} T=S={length} H={H} K={K} D={D} bfloat16'
  print(f'{timing.describe(info)}; {info["devices"][0]}; {shape}')
  rows = []
  for name, options in calls(length).items():
    row = check(name, options, length, args.repeats)
    rows.append(row)
    errors = ', '.join(
      f'{n} {e:.1e}' for n, e in row['max error vs reference (float32)'].items()
    )
    print(f'- {name}: auto -> {row["auto"]}; errors: {errors}')
    for label, t in row['times'].items():
      forward, both = t['forward s'] * 1e3, t['forward+backward s'] * 1e3
      print(
        f'    {label}: fwd {forward:.2f} ms ({t["forward vs flash"]:.2f}x flash), '
        f'fwd+bwd {both:.2f} ms ({t["forward+backward vs flash"]:.2f}x)'
      )
  with open(args.out, 'w') as file:
    json.dump({'machine': info, 'length': length, 'calls': rows}, file, indent=1)
  print(f'written to {args.out}')


if __name__ == '__main__':
  main()
