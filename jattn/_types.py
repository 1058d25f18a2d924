"""The values every layer shares: a leaf module (it imports no other).

``Options`` (everything static about a call), ``Prepared`` (the call every
kernel takes) and the block states of a block plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

# Block states, ordered as the kernels visit them: a (query block, key block)
# pair is partial (test each element), full (no test) or hidden (skipped).
PARTIAL, FULL, HIDDEN = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything static about a call (hashable: a ``jax.jit`` static argument).

  ``scale`` None means ``1/sqrt(D)`` (``prepare`` fills it in); ``dropout_rate``
  is 0 unless dropout will really be applied (a key is given and the call is
  not deterministic).
  """

  scale: float | None = None
  is_causal: bool = False
  window: tuple[int, int] | None = None
  chunk_size: int | None = None
  soft_cap: float | None = None
  dropout_rate: float = 0.0
  implementation: str | None = None
  block_sizes: tuple[int, int] | None = None
  return_residual: bool = False


# The public keywords of the options named otherwise here.
OPTION_NAMES = {
  'window': 'local_window_size',
  'chunk_size': 'attention_chunk_size',
  'soft_cap': 'logits_soft_cap',
  'dropout_rate': 'dropout',
}


def options_given(opts: Options) -> list[str]:
  """The options set away from their defaults."""
  return [
    field.name
    for field in dataclasses.fields(opts)
    if getattr(opts, field.name) != field.default
  ]


class Prepared(NamedTuple):
  """Kernel-ready arguments (what every kernel takes): one flat batch axis
  B = prod(B...).

  q [B, T, H, D], k [B, S, K, D], v [B, S, K, V] or None; bias
  [B|1, H|1, T|1, S|1] or None; vis: who may attend (its arrays batched);
  seed [B, H] uint32 for dropout or None; opts with its scale resolved;
  batch_shape is the caller's B...; empty when B, T or S is zero; backend:
  the platform the call compiles for ('cpu', 'gpu', 'tpu'); sinks [H]
  float32 attention-sink logits or None.
  """

  q: jnp.ndarray
  k: jnp.ndarray
  v: jnp.ndarray | None
  bias: jnp.ndarray | None
  vis: Any  # jattn._visibility.Visibility
  seed: jnp.ndarray | None
  opts: Options
  batch_shape: tuple[int, ...]
  empty: bool = False
  backend: str = 'cpu'
  sinks: jnp.ndarray | None = None
  score_mod: Any = None  # a jattn._mods.Mod
  # k and v are views [B, S, K, D|V] of keys and values stored head-major
  # [B, K, S, D|V] (a cache): a kernel that reads that layout swaps them back,
  # and under jit the two transposes cancel.
  kv_heads_first: bool = False
