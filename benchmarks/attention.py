"""Attention speed and memory: jattn against jax.nn, Flax and PyTorch SDPA.

    python -m benchmarks.attention            # full grid (tens of minutes)
    python -m benchmarks.attention --quick    # T in {512, 2048}, float32

Every row is measured in one process on one machine: forward and
forward+backward time (median of --repeats runs after a warm-up; compile time
apart), GFLOP/s by FlashAttention's formula, the compiled temp memory from
``memory_analysis()`` (JAX only) and the growth of the process's peak RSS
while the row ran. Ratios compare jattn's default with each peer in the same
run. Writes a table to stdout, JSON and a PNG plot to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jattn
from benchmarks import timing
from jattn import testing

B, H, D = 1, 8, 64


def jax_impls():
  """name -> f(q, k, v, causal) over [B, T, H, D] arrays."""
  from flax import nnx

  return {
    'jattn': lambda q, k, v, c: jattn.dot_product_attention(q, k, v, is_causal=c),
    'jattn-reference': lambda q, k, v, c: jattn.dot_product_attention(
      q, k, v, is_causal=c, implementation='reference'
    ),
    'jax.nn': lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c),
    'flax.nnx': lambda q, k, v, c: nnx.dot_product_attention(q, k, v, is_causal=c),
  }


def measure_jax(fn, shape, dtype, causal, backward, repeats):
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)
  if backward:
    loss = lambda q, k, v: fn(q, k, v, causal).astype(jnp.float32).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  else:
    step = jax.jit(lambda q, k, v: fn(q, k, v, causal))
  start = time.perf_counter()
  compiled = step.lower(q, k, v).compile()
  compile_s = time.perf_counter() - start
  temp = testing.temp_bytes(compiled)
  rss_before = timing.peak_rss_mib()
  run = lambda: jax.block_until_ready(compiled(q, k, v))
  run()
  seconds = timing.median_seconds(run, repeats)
  return {
    'seconds': seconds,
    'compile_seconds': compile_s,
    'temp_mib': temp / 2**20,
    'rss_growth_mib': timing.peak_rss_mib() - rss_before,
  }


def measure_torch(shape, dtype, causal, backward, repeats):
  import torch

  torch_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
  b, t, h, d = shape
  q, k, v = (
    torch.randn(b, h, t, d, dtype=torch_dtype, requires_grad=backward) for _ in range(3)
  )
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def run():
    out = sdpa(q, k, v, is_causal=causal)
    if backward:
      out.float().sum().backward()

  rss_before = timing.peak_rss_mib()
  run()
  seconds = timing.median_seconds(run, repeats)
  return {
    'seconds': seconds,
    'compile_seconds': 0.0,
    'temp_mib': None,
    'rss_growth_mib': timing.peak_rss_mib() - rss_before,
  }


def has_torch() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def run_grid(lengths, dtypes, repeats, skip_reference_above):
  rows = []
  impls = jax_impls()
  torch_ok = has_torch()
  for dtype in dtypes:
    for t in lengths:
      for causal in (False, True):
        for backward in (False, True):
          shape = (B, t, H, D)
          names = [*impls, 'torch-sdpa'] if torch_ok else list(impls)
          for name in names:
            if name == 'jattn-reference' and t > skip_reference_above:
              continue
            if name == 'torch-sdpa':
              result = measure_torch(shape, dtype, causal, backward, repeats)
            else:
              result = measure_jax(
                impls[name], shape, jnp.dtype(dtype), causal, backward, repeats
              )
            flops = timing.attention_flops(
              B, H, t, t, D, causal=causal, backward=backward
            )
            row = {
              'impl': name,
              'dtype': dtype,
              'T': t,
              'causal': causal,
              'pass': 'fwd+bwd' if backward else 'fwd',
              'gflops': flops / result['seconds'] / 1e9,
              **result,
            }
            rows.append(row)
            print(format_row(row), flush=True)
  return rows


def add_ratios(rows):
  """jattn's throughput over each peer's, for the same configuration."""
  key = lambda r: (r['dtype'], r['T'], r['causal'], r['pass'])
  ours = {key(r): r['seconds'] for r in rows if r['impl'] == 'jattn'}
  for r in rows:
    r['jattn_speedup'] = r['seconds'] / ours[key(r)] if key(r) in ours else None
  return rows


def format_row(r):
  temp = '-' if r['temp_mib'] is None else f'{r["temp_mib"]:.0f}'
  speedup = r.get('jattn_speedup')
  ratio = '' if speedup is None else f'{speedup:6.2f}x'
  return (
    f'{r["impl"]:16s} {r["dtype"]:8s} T={r["T"]:<5d} '
    f'{"causal" if r["causal"] else "full  "} {r["pass"]:7s} '
    f'{r["seconds"] * 1e3:9.1f} ms {r["gflops"]:7.1f} GFLOP/s '
    f'compile {r["compile_seconds"]:5.1f} s temp {temp:>6s} MiB '
    f'rss+ {r["rss_growth_mib"]:6.0f} MiB {ratio}'
  )


def causal_speedups(rows):
  """Wall-time ratio non-causal / causal for jattn (blocks skipped)."""
  out = {}
  for r in rows:
    if r['impl'] != 'jattn' or not r['causal']:
      continue
    full = next(
      x
      for x in rows
      if x['impl'] == 'jattn'
      and not x['causal']
      and (x['dtype'], x['T'], x['pass']) == (r['dtype'], r['T'], r['pass'])
    )
    out[f'{r["dtype"]} T={r["T"]} {r["pass"]}'] = full['seconds'] / r['seconds']
  return out


def plot(rows, path: Path):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  dtypes = sorted({r['dtype'] for r in rows})
  fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 4 * len(dtypes)), squeeze=False)
  for row_axes, dtype in zip(axes, dtypes, strict=True):
    for ax, pass_ in zip(row_axes, ('fwd', 'fwd+bwd'), strict=True):
      for impl in sorted({r['impl'] for r in rows}):
        for causal, style in ((False, '-'), (True, '--')):
          pts = sorted(
            (r['T'], r['gflops'])
            for r in rows
            if (r['impl'], r['dtype'], r['pass'], r['causal'])
            == (impl, dtype, pass_, causal)
          )
          if pts:
            ax.plot(
              *zip(*pts, strict=True),
              style,
              marker='o',
              label=f'{impl}{" causal" if causal else ""}',
            )
      ax.set(
        xscale='log',
        xlabel='sequence length T = S',
        ylabel='GFLOP/s',
        title=f'{pass_}, {dtype}, B={B} H={H} D={D}',
      )
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--quick', action='store_true', help='T in {512, 2048}, float32 only'
  )
  parser.add_argument('--lengths', type=int, nargs='+', default=[512, 2048, 8192])
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--skip-reference-above',
    type=int,
    default=2048,
    help="longest T for jattn's O(T*S) reference path",
  )
  parser.add_argument('--out', type=Path, default=Path('bench_results'))
  args = parser.parse_args()
  if args.quick:
    args.lengths, args.dtypes = [512, 2048], ['float32']
  args.out.mkdir(parents=True, exist_ok=True)
  print(timing.describe(timing.machine()))
  rows = add_ratios(
    run_grid(args.lengths, args.dtypes, args.repeats, args.skip_reference_above)
  )
  print('\nAll rows, with jattn speed-up (peer time / jattn time):')
  for r in rows:
    print(format_row(r))
  speedups = causal_speedups(rows)
  print('\njattn causal speed-up over non-causal (wall time):')
  for name, value in speedups.items():
    print(f'  {name}: {value:.2f}x')
  result = {
    'machine': timing.machine(),
    'shape': {'B': B, 'H': H, 'D': D},
    'repeats': args.repeats,
    'rows': rows,
    'causal_speedup': speedups,
  }
  (args.out / 'attention.json').write_text(json.dumps(result, indent=1))
  plot(rows, args.out / 'attention.png')
  print(f'\nwrote {args.out / "attention.json"} and {args.out / "attention.png"}')


if __name__ == '__main__':
  main()
