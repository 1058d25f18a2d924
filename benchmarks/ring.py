"""Ring attention on 1, 2, 4 and 8 virtual CPU devices at a fixed total length.

    python -m benchmarks.ring                 # T = S = 16384, B=1 H=8 D=64
    python -m benchmarks.ring --length 4096

Per-device compiled temp memory (``memory_analysis()``) and wall time of one
causal forward+backward, beside single-device flash. The virtual devices share
the machine's cores, so wall time here shows overhead, not speed-up; memory
and correctness are the point. Writes JSON to --out.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
from benchmarks import timing
from jattn import sharding, testing

jax.config.update('jax_num_cpu_devices', 8)
B, H, D = 1, 8, 64


def measure(fn, args, repeats):
  start = time.perf_counter()
  compiled = testing.compiled_gradient(fn, *args)
  compile_s = time.perf_counter() - start
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  return {
    'temp_mib': testing.temp_bytes(compiled) / 2**20,
    'seconds': timing.median_seconds(run, repeats),
    'compile_seconds': compile_s,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=16384)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  keys = jax.random.split(jax.random.key(0), 3)
  qkv = [jax.random.normal(k, (B, args.length, H, D), jnp.float32) for k in keys]
  rows = [
    {
      'impl': 'flash, 1 device',
      'devices': 1,
      **measure(
        lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=True),
        qkv,
        args.repeats,
      ),
    }
  ]
  print(rows[-1], flush=True)
  for n in (1, 2, 4, 8):
    mesh = sharding.make_mesh({'seq': n}, devices=jax.devices()[:n])
    spec = NamedSharding(mesh, P(None, 'seq'))
    placed = [jax.device_put(x, spec) for x in qkv]
    ring = lambda q, k, v, mesh=mesh: sharding.ring_attention(
      q, k, v, mesh=mesh, is_causal=True
    )
    rows.append(
      {
        'impl': f'ring, {n} devices',
        'devices': n,
        **measure(ring, placed, args.repeats),
      }
    )
    print(rows[-1], flush=True)
  print(f'\ncausal fwd+bwd, T=S={args.length}, B={B} H={H} D={D}, float32')
  print(
    f'{"implementation":18s} {"temp MiB/device":>16s} {"vs flash":>9s} {"wall s":>8s}'
  )
  for r in rows:
    print(
      f'{r["impl"]:18s} {r["temp_mib"]:16.1f} '
      f'{r["temp_mib"] / rows[0]["temp_mib"]:9.2f} {r["seconds"]:8.2f}'
    )
  (args.out / 'ring.json').write_text(
    json.dumps({'machine': timing.machine(), 'T': args.length, 'rows': rows}, indent=1)
  )


if __name__ == '__main__':
  main()
