"""The static options of an attention call: validated once, passed as one value.

``make_options`` runs at the public boundary, before ``jax.jit``: it accepts
Python and NumPy scalars (and concrete 0-d arrays) where numbers are expected,
rejects everything else with an error that names the argument, and returns a
hashable ``Options`` that every layer below takes as it is.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np

from jattn._types import Options


def _concrete(value, name: str):
  """A 0-d array or NumPy scalar -> its Python value; a tracer -> TypeError."""
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, 'shape'):
    if getattr(value, 'shape', None) != ():
      raise TypeError(f'`{name}` must be a scalar; got shape {value.shape}.')
    try:
      return np.asarray(value).item()
    except Exception:  # a tracer: the option shapes the computation
      raise TypeError(
        f'`{name}` must be a concrete number, not a traced value: it is static '
        '(mark it static in your jax.jit, or close over it).'
      ) from None
  return value


def as_bool(value, name: str, *, allow_none: bool = False) -> bool | None:
  value = _concrete(value, name)
  if value is None and allow_none:
    return None
  if not isinstance(value, bool):
    allowed = 'True, False or None' if allow_none else 'True or False'
    raise TypeError(f'`{name}` must be {allowed}; got {value!r}.')
  return value


def as_int(value, name: str, *, minimum: int) -> int:
  value = _concrete(value, name)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f'`{name}` must be an int; got {value!r}.')
  if value < minimum:
    raise ValueError(f'`{name}` must be >= {minimum}; got {value}.')
  return int(value)


def as_float(value, name: str) -> float:
  value = _concrete(value, name)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'`{name}` must be a real number; got {value!r}.')
  return float(value)


def normalize_window(local_window_size) -> tuple[int, int] | None:
  """``w`` -> ``(w, w)``; ``(left, right)`` checked; None stays None."""
  name = 'local_window_size'
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (tuple, list)):
    if len(local_window_size) != 2:
      raise TypeError(
        f'`{name}` must be an int or a (left, right) pair of ints; got '
        f'{local_window_size!r}.'
      )
    return tuple(as_int(w, name, minimum=0) for w in local_window_size)
  size = as_int(local_window_size, name, minimum=0)
  return size, size


def check_block_sizes(block_sizes) -> tuple[int, int] | None:
  if block_sizes is None:
    return None
  if not isinstance(block_sizes, (tuple, list)) or len(block_sizes) != 2:
    raise ValueError(
      f'`block_sizes` must be a (query, key) pair of positive ints; got '
      f'{block_sizes!r}.'
    )
  return tuple(as_int(b, 'block_sizes', minimum=1) for b in block_sizes)


# Default (query, key) block sizes by backend; measured on a 2-core CPU with
# benchmarks/attention.py, where larger key blocks amortise loop overhead.
DEFAULT_BLOCKS = {'cpu': (512, 256), 'gpu': (128, 128), 'tpu': (512, 512)}


def block_sizes(q_len: int, kv_len: int, requested=None) -> tuple[int, int]:
  """Blocks for this shape and backend (or ``requested``), shrunk to the
  lengths rounded up to a multiple of 8."""
  block_q, block_k = requested or DEFAULT_BLOCKS.get(jax.default_backend(), (256, 256))
  round8 = lambda n: -(-n // 8) * 8
  return min(block_q, round8(q_len)), min(block_k, round8(kv_len))


def check_dropout_rate(dropout_rate) -> float:
  dropout_rate = as_float(dropout_rate, 'dropout_rate')
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'`dropout_rate` must be in [0, 1); got {dropout_rate}.')
  return dropout_rate


def make_options(
  *,
  scale=None,
  is_causal=False,
  local_window_size=None,
  attention_chunk_size=None,
  logits_soft_cap=None,
  dropout_rate=0.0,
  dropout_rng=None,
  deterministic=None,
  implementation=None,
  block_sizes=None,
  return_residual=False,
) -> Options:
  """Check every non-array argument of an attention call; fold them into
  ``Options``. ``dropout_rng`` is only looked at for whether it is given."""
  if scale is not None:
    scale = as_float(scale, 'scale')
    if not math.isfinite(scale) or scale == 0.0:
      raise ValueError(f'`scale` must be finite and non-zero; got {scale}.')
  if logits_soft_cap is not None:
    logits_soft_cap = as_float(logits_soft_cap, 'logits_soft_cap')
    if not (math.isfinite(logits_soft_cap) and logits_soft_cap > 0):
      raise ValueError(
        f'`logits_soft_cap` must be a finite positive number or None; got '
        f'{logits_soft_cap}.'
      )
  dropout_rate = check_dropout_rate(dropout_rate)
  deterministic = as_bool(deterministic, 'deterministic', allow_none=True)
  if deterministic is False and dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(
      '`dropout_rng` is required when deterministic=False and '
      f'dropout_rate={dropout_rate} > 0.'
    )
  applied = dropout_rate > 0.0 and dropout_rng is not None and not deterministic
  return Options(
    scale=scale,
    is_causal=as_bool(is_causal, 'is_causal'),
    window=normalize_window(local_window_size),
    chunk_size=None
    if attention_chunk_size is None
    else as_int(attention_chunk_size, 'attention_chunk_size', minimum=1),
    soft_cap=logits_soft_cap,
    dropout_rate=dropout_rate if applied else 0.0,
    implementation=implementation,
    block_sizes=check_block_sizes(block_sizes),
    return_residual=as_bool(return_residual, 'return_residual'),
  )
