"""Forward+backward at a long sequence through jattn, in a fresh process.

    python -m benchmarks.long_sequence            # T = S = 65536, B=1 H=8 D=64
    python -m benchmarks.long_sequence --length 16384

The child process runs one jitted gradient of jattn's default attention and
reports its peak RSS; beside it, the temp memory ``jax.nn.dot_product_attention``
would need for the same gradient, read from ``memory_analysis()`` of its
compiled program without running it. Also checks that jattn's compiled temp
memory grows linearly in T (T and T/2). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import timing

B, H, D = 1, 8, 64


def child(t: int, causal: bool) -> None:
  """Run in a fresh process (``--child``): one jitted gradient of jattn's
  default attention; prints its timings and peak RSS as one JSON line."""
  import jax
  import jax.numpy as jnp

  import jattn
  from jattn import testing

  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (B, t, H, D), jnp.float32) for key in keys)
  fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal)
  start = time.perf_counter()
  compiled = testing.compiled_gradient(fn, q, k, v)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  grads = jax.block_until_ready(compiled(q, k, v))
  seconds = time.perf_counter() - start
  result = {
    'seconds': seconds,
    'compile_seconds': compile_s,
    'finite': all(bool(jnp.isfinite(g).all()) for g in grads),
    'temp_mib': testing.temp_bytes(compiled) / 2**20,
    'peak_rss_mib': timing.peak_rss_mib(),
  }
  print(json.dumps(result))


def compiled_temp_mib(fn, t: int) -> float:
  import jax
  import jax.numpy as jnp

  from jattn import testing

  spec = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
  return testing.temp_bytes(testing.compiled_gradient(fn, spec, spec, spec)) / 2**20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=65536)
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.length, args.causal)
    return
  args.out.mkdir(parents=True, exist_ok=True)

  import jax

  import jattn

  t = args.length
  ours = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=args.causal)
  peer = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=args.causal)
  growth = {n: compiled_temp_mib(ours, n) for n in (t // 2, t)}
  peer_temp = compiled_temp_mib(peer, t)
  print(
    f'jattn compiled temp, fwd+bwd: T={t // 2}: {growth[t // 2]:.1f} MiB, '
    f'T={t}: {growth[t]:.1f} MiB (x{growth[t] / growth[t // 2]:.2f} for 2x T)'
  )
  print(
    f'jax.nn.dot_product_attention would need {peer_temp / 1024:.1f} GiB temp '
    f'(compiled, not run)'
  )

  start = time.perf_counter()
  command = [sys.executable, '-m', 'benchmarks.long_sequence', '--child']
  command += ['--length', str(t)] + (['--causal'] if args.causal else [])
  process = subprocess.run(
    command,
    capture_output=True,
    text=True,
    check=False,
  )
  if process.returncode != 0:
    sys.exit(f'child failed ({process.returncode}):\n{process.stderr[-3000:]}')
  run = json.loads(process.stdout.strip().splitlines()[-1])
  print(
    f'jattn fwd+bwd T=S={t} (B={B} H={H} D={D}, float32, '
    f'{"causal" if args.causal else "full"}): {run["seconds"]:.1f} s '
    f'(+{run["compile_seconds"]:.1f} s compile), peak RSS '
    f'{run["peak_rss_mib"] / 1024:.2f} GiB, gradients finite: {run["finite"]}, '
    f'wall {time.perf_counter() - start:.0f} s'
  )
  result = {
    'machine': timing.machine(),
    'T': t,
    'causal': args.causal,
    'shape': {'B': B, 'H': H, 'D': D},
    'jattn_child': run,
    'jattn_temp_mib': {str(k): v for k, v in growth.items()},
    'jax_nn_temp_mib': peer_temp,
  }
  name = f'long_sequence_{t}{"_causal" if args.causal else ""}.json'
  (args.out / name).write_text(json.dumps(result, indent=1))
  print(f'wrote {args.out / name}')


if __name__ == '__main__':
  main()
