"""Boolean attention masks (True = may attend), each a small pure function.

Every mask broadcasts to the logits layout ``[B..., H, T, S]``. The position
predicates (``*_from_positions``) are what the kernels evaluate block by block;
the array builders below are thin conveniences over them.
"""

from __future__ import annotations

import jax.numpy as jnp

Window = tuple[int, int]


def normalize_window(local_window_size: int | tuple[int, int] | None):
  """``w`` -> ``(w, w)``; ``(left, right)`` unchanged; negative -> ValueError."""
  if local_window_size is None:
    return None
  if isinstance(local_window_size, int):
    window = (local_window_size, local_window_size)
  else:
    window = tuple(local_window_size)
  if len(window) != 2 or not all(isinstance(w, int) for w in window):
    raise TypeError(
      '`local_window_size` must be an int or a (left, right) pair of ints; '
      f'got {local_window_size!r}.'
    )
  if min(window) < 0:
    raise ValueError(
      f'`local_window_size` must be non-negative; got {local_window_size!r}.'
    )
  return window


def causal_from_positions(q_pos: jnp.ndarray, kv_pos: jnp.ndarray):
  """Top-left causal: query ``i`` sees keys ``0..i``. ``[T], [S] -> [T, S]``."""
  return q_pos[:, None] >= kv_pos[None, :]


def window_from_positions(q_pos: jnp.ndarray, kv_pos: jnp.ndarray, window):
  """Query ``i`` sees keys ``i - left .. i + right``. ``[T], [S] -> [T, S]``."""
  left, right = window
  offset = kv_pos[None, :] - q_pos[:, None]
  return (offset >= -left) & (offset <= right)


def causal_mask(q_len: int, kv_len: int) -> jnp.ndarray:
  """``[T, S]`` top-left causal mask (like ``jax.nn`` and PyTorch SDPA)."""
  return causal_from_positions(jnp.arange(q_len), jnp.arange(kv_len))


def local_window_mask(
  q_len: int, kv_len: int, local_window_size: int | tuple[int, int]
) -> jnp.ndarray:
  """``[T, S]`` sliding-window mask; an int ``w`` means ``(w, w)``."""
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

  def valid(lengths, n):
    if lengths is None:
      return jnp.ones((n,), bool)
    lengths = jnp.asarray(lengths)
    positions = jnp.arange(n).reshape((1,) * lengths.ndim + (n,))
    return positions < lengths[..., None]

  q_valid = valid(query_lengths, q_len)
  kv_valid = valid(key_value_lengths, kv_len)
  batch = jnp.broadcast_shapes(q_valid.shape[:-1], kv_valid.shape[:-1])
  q_valid = jnp.broadcast_to(q_valid, batch + (q_len,))
  kv_valid = jnp.broadcast_to(kv_valid, batch + (kv_len,))
  return (q_valid[..., :, None] & kv_valid[..., None, :])[..., None, :, :]


def segment_mask(
  q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray | None = None
) -> jnp.ndarray:
  """``[B..., 1, T, S]`` mask: query and key share a segment id (packing)."""
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  same = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
  return same[..., None, :, :]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
  """Logical AND of the masks that are not None (None if all are)."""
  present = [jnp.asarray(m) for m in masks if m is not None]
  if not present:
    return None
  rank = max(m.ndim for m in present)
  combined = None
  for m in present:
    m = m.reshape((1,) * (rank - m.ndim) + m.shape)  # explicit rank promotion
    combined = m if combined is None else jnp.logical_and(combined, m)
  return combined
