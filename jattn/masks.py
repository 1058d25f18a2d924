"""Boolean attention masks (True = may attend), each a small pure function.

Every mask broadcasts to the logits layout ``[B..., H, T, S]``. The position
predicates (``*_from_positions``) are what the kernels evaluate block by block;
the array builders below are thin conveniences over them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _checks
from jattn._options import as_int, normalize_window


def _lengths(lengths, name: str):
  """Integer ``[B...]`` lengths; negative ones (when known) -> ValueError."""
  lengths = jnp.asarray(lengths) if not hasattr(lengths, 'dtype') else lengths
  _checks.check_integer(lengths, name)
  try:
    known = np.asarray(lengths)
  except jax.errors.TracerArrayConversionError:
    return lengths  # traced: its values are not known here
  if known.size and known.min() < 0:
    raise ValueError(f'`{name}` must be non-negative; got {known.tolist()}.')
  return lengths


def causal_from_positions(q_pos: jnp.ndarray, kv_pos: jnp.ndarray):
  """Top-left causal: query ``i`` sees keys ``0..i``. ``[T], [S] -> [T, S]``."""
  return q_pos[:, None] >= kv_pos[None, :]


def window_from_positions(q_pos: jnp.ndarray, kv_pos: jnp.ndarray, window):
  """Query ``i`` sees keys ``i - left .. i + right``. ``[T], [S] -> [T, S]``."""
  left, right = window
  offset = kv_pos[None, :] - q_pos[:, None]
  return (offset >= -left) & (offset <= right)


def chunk_from_positions(q_pos: jnp.ndarray, kv_pos: jnp.ndarray, chunk_size: int):
  """Query ``i`` sees keys of its own chunk: ``i // C == j // C``."""
  return (q_pos[:, None] // chunk_size) == (kv_pos[None, :] // chunk_size)


def causal_mask(q_len: int, kv_len: int) -> jnp.ndarray:
  """``[T, S]`` top-left causal mask (like ``jax.nn`` and PyTorch SDPA)."""
  q_len, kv_len = as_int(q_len, 'q_len', minimum=0), as_int(kv_len, 'kv_len', minimum=0)
  return causal_from_positions(jnp.arange(q_len), jnp.arange(kv_len))


def local_window_mask(
  q_len: int, kv_len: int, local_window_size: int | tuple[int, int]
) -> jnp.ndarray:
  """``[T, S]`` sliding-window mask; an int ``w`` means ``(w, w)``."""
  q_len, kv_len = as_int(q_len, 'q_len', minimum=0), as_int(kv_len, 'kv_len', minimum=0)
  window = normalize_window(local_window_size)
  return window_from_positions(jnp.arange(q_len), jnp.arange(kv_len), window)


def padding_mask(
  query_lengths: jnp.ndarray | None,
  key_value_lengths: jnp.ndarray | None,
  q_len: int,
  kv_len: int,
) -> jnp.ndarray:
  """``[B..., 1, T, S]`` mask of the valid prefix of each sequence.

  ``query_lengths`` and ``key_value_lengths`` are integer ``[B...]``; either
  may be None (all valid). Padded query rows attend to nothing.
  """

  q_len, kv_len = as_int(q_len, 'q_len', minimum=0), as_int(kv_len, 'kv_len', minimum=0)

  def valid(lengths, n, name):
    if lengths is None:
      return jnp.ones((n,), bool)
    lengths = _lengths(lengths, name)
    positions = jnp.arange(n).reshape((1,) * lengths.ndim + (n,))
    return positions < lengths[..., None]

  q_valid = valid(query_lengths, q_len, 'query_lengths')
  kv_valid = valid(key_value_lengths, kv_len, 'key_value_lengths')
  batch = _broadcast_shape(
    {'query_lengths': q_valid.shape[:-1], 'key_value_lengths': kv_valid.shape[:-1]}
  )
  q_valid = jnp.broadcast_to(q_valid, batch + (q_len,))
  kv_valid = jnp.broadcast_to(kv_valid, batch + (kv_len,))
  return (q_valid[..., :, None] & kv_valid[..., None, :])[..., None, :, :]


def segment_mask(
  q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray | None = None
) -> jnp.ndarray:
  """``[B..., 1, T, S]`` mask: query and key share a segment id (packing).

  ``q_segment_ids [B..., T]``, ``kv_segment_ids [B..., S]`` (default: the
  query's), integers with batch dims that broadcast.
  """
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  ids = {'q_segment_ids': q_segment_ids, 'kv_segment_ids': kv_segment_ids}
  for name, x in ids.items():
    _checks.check_array(x, name, min_rank=1, layout='[B..., T|S]')
    _checks.check_integer(x, name)
  if q_segment_ids.ndim != kv_segment_ids.ndim:
    raise ValueError(
      f'`q_segment_ids` [B..., T] and `kv_segment_ids` [B..., S] must have one '
      f'rank; got {tuple(q_segment_ids.shape)} and {tuple(kv_segment_ids.shape)}.'
    )
  _broadcast_shape({name: x.shape[:-1] for name, x in ids.items()})
  same = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
  return same[..., None, :, :]


def _broadcast_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
  """The common broadcast shape, or a ValueError that quotes every shape."""
  try:
    return np.broadcast_shapes(*shapes.values())
  except ValueError:
    described = ', '.join(f'{name} {tuple(s)}' for name, s in shapes.items())
    raise ValueError(f'shapes do not broadcast together: {described}.') from None


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
  """Logical AND of the boolean masks that are not None (None if all are)."""
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  for i, m in enumerate(present):
    _checks.check_bool(m, f'masks[{i}]')
  _broadcast_shape({f'masks[{i}]': m.shape for i, m in enumerate(present)})
  rank = max(m.ndim for m in present)
  combined = None
  for m in present:
    m = m.reshape((1,) * (rank - m.ndim) + m.shape)  # explicit rank promotion
    combined = m if combined is None else jnp.logical_and(combined, m)
  return combined
