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

B, H, D = 1, 8, 64

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
import jattn
t, causal = int(sys.argv[1]), sys.argv[2] == '1'
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (1, t, 8, 64), jnp.float32) for key in keys)
loss = lambda q, k, v: jattn.dot_product_attention(q, k, v, is_causal=causal).sum()
grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
start = time.perf_counter()
compiled = grad.lower(q, k, v).compile()
compile_s = time.perf_counter() - start
start = time.perf_counter()
grads = jax.block_until_ready(compiled(q, k, v))
seconds = time.perf_counter() - start
finite = all(bool(jnp.isfinite(g).all()) for g in grads)
print(json.dumps({
    'seconds': seconds, 'compile_seconds': compile_s, 'finite': finite,
    'temp_mib': compiled.memory_analysis().temp_size_in_bytes / 2**20,
    'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def compiled_temp_mib(fn, t: int) -> float:
  import jax
  import jax.numpy as jnp

  spec = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
  loss = lambda q, k, v: fn(q, k, v).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return (
    grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes / 2**20
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=65536)
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
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
  child = subprocess.run(
    [sys.executable, '-c', CHILD, str(t), '1' if args.causal else '0'],
    capture_output=True,
    text=True,
    check=False,
  )
  if child.returncode != 0:
    sys.exit(f'child failed ({child.returncode}):\n{child.stderr[-3000:]}')
  run = json.loads(child.stdout.strip().splitlines()[-1])
  print(
    f'jattn fwd+bwd T=S={t} (B={B} H={H} D={D}, float32, '
    f'{"causal" if args.causal else "full"}): {run["seconds"]:.1f} s '
    f'(+{run["compile_seconds"]:.1f} s compile), peak RSS '
    f'{run["peak_rss_mib"] / 1024:.2f} GiB, gradients finite: {run["finite"]}, '
    f'wall {time.perf_counter() - start:.0f} s'
  )
  result = {
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
