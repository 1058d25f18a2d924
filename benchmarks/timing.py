"""How every figure is taken: warm-up, block_until_ready, median of N runs."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import jax


def machine() -> dict:
  """What a figure is measured on: CPU model and cores, JAX and its backend."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as file:
      fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(':') for line in file)
        if value
      )
    cpu = (
      f'{fields["model name"]} (family {fields["cpu family"]}, model {fields["model"]})'
    )
  except (OSError, KeyError):  # not Linux, or not x86
    pass
  return {
    'cpu': cpu,
    'cores': os.cpu_count(),
    'jax': jax.__version__,
    'backend': jax.default_backend(),
  }


def describe(info: dict) -> str:
  """``machine()`` as one line."""
  return f'{info["cpu"]}, {info["cores"]} cores; jax {info["jax"]} on {info["backend"]}'


def peak_rss_mib() -> float:
  """This process's peak resident set size so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(run: Callable[[], object], repeats: int) -> float:
  """Median wall time of ``repeats`` calls of ``run`` (which must block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def attention_flops(batch, heads, q_len, kv_len, head_dim, *, causal, backward):
  """FlashAttention's count: forward 4·B·H·T·S·D (half if causal), backward 2.5x."""
  flops = 4 * batch * heads * q_len * kv_len * head_dim
  if causal:
    flops /= 2
  return flops * (3.5 if backward else 1.0)
