"""How every figure is taken: warm-up, block_until_ready, median of N runs."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable


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
