"""Trace-time argument checks that speak to the user.

chex does the checking; these helpers turn its ``AssertionError`` into a
``ValueError``/``TypeError`` that names the argument, the expected layout (in
the shape legend of DESIGN.md) and what was passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


@contextlib.contextmanager
def _as_value_error(message: str) -> Iterator[None]:
  try:
    yield
  except AssertionError:
    raise ValueError(message) from None


def check_array(x, name: str, *, min_rank: int, layout: str) -> None:
  """``x`` is a JAX/NumPy array of rank >= ``min_rank`` (``layout`` names it)."""
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'`{name}` must be an array {layout}; got {type(x).__name__}.')
  ranks = set(range(min_rank, max(min_rank, x.ndim) + 1))
  with _as_value_error(
    f'`{name}` must have layout {layout} (rank >= {min_rank}); '
    f'got shape {tuple(x.shape)}.'
  ):
    chex.assert_rank(x, ranks)


def check_floating(x, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'`{name}` must have a floating dtype; got {x.dtype}.')


def check_same_dtype(arrays: dict[str, jnp.ndarray]) -> None:
  dtypes = {name: x.dtype for name, x in arrays.items()}
  if len(set(dtypes.values())) > 1:
    described = ', '.join(f'{n}={d}' for n, d in dtypes.items())
    raise TypeError(f'{", ".join(dtypes)} must share one dtype; got {described}.')


def check_dim(x, name: str, axis: int, expected: int, layout: str, what: str) -> None:
  """``x.shape[axis] == expected``; ``what`` says which dimension it is."""
  with _as_value_error(
    f'`{name}` {layout}: {what} must be {expected}; got shape {tuple(x.shape)}.'
  ):
    chex.assert_axis_dimension(x, axis, expected)


def check_shape(x, name: str, expected: Sequence[int], layout: str) -> None:
  with _as_value_error(
    f'`{name}` must have shape {layout} = {tuple(expected)}; got {tuple(x.shape)}.'
  ):
    chex.assert_shape(x, tuple(expected))


def check_broadcastable(x, name: str, target: Sequence[int], layout: str):
  """``x`` broadcasts to ``target`` (right-aligned, NumPy rules)."""
  with _as_value_error(
    f'`{name}` of shape {tuple(x.shape)} does not broadcast to '
    f'{layout} = {tuple(target)}.'
  ):
    chex.assert_is_broadcastable(tuple(x.shape), tuple(target))


def check_integer(x, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f'`{name}` must have an integer dtype; got {x.dtype}.')


def check_bool(x, name: str) -> None:
  if x.dtype != np.bool_:
    raise TypeError(
      f'`{name}` must be boolean (True = may attend); got {x.dtype}. '
      f'Convert a 0/1 mask with `{name} != 0`; pass an additive mask '
      '(0 / -inf) as `bias`.'
    )


def check_prng_key(rng, name: str) -> None:
  """``rng`` is one PRNG key: typed (``jax.random.key``) or raw uint32 ``[2]``."""
  dtype = getattr(rng, 'dtype', None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  raw = dtype == np.uint32 and tuple(rng.shape) == (2,)
  if not (typed and rng.ndim == 0) and not raw:
    raise TypeError(
      f'`{name}` must be one PRNG key (jax.random.key(...) or '
      f'jax.random.PRNGKey(...)); got {type(rng).__name__} with dtype '
      f'{dtype} and shape {tuple(getattr(rng, "shape", ()))}.'
    )


def check_float_dtype(dtype, name: str):
  """``dtype`` names a floating dtype; returns it as a NumPy dtype."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f'`{name}` must be a floating dtype; got {dtype!r}.') from None
  if not jnp.issubdtype(resolved, jnp.floating):
    raise TypeError(f'`{name}` must be a floating dtype; got {resolved}.')
  return resolved
