"""Heads by ``jax.vmap``: a single-head, unbatched kernel applied to all heads.

A kernel's head function takes ``q [T, D]``, ``k [S, D]``, ``v [S, V]``, a
bias ``[T|1, S|1]`` (or None), the head's ``Visibility`` and its dropout seed;
``map_heads`` vmaps it over query heads within a KV group, over KV heads and
over the batch. Query head h reads KV head ``h // G``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jattn._visibility import Visibility


def _split_heads(x, batch: int, num_kv: int, groups: int):
  """``[B|1, H|1, T, S]`` -> (array, batch axis, head axis) for the vmaps."""
  if x is None:
    return None, None, None
  batch_axis = 0 if x.shape[0] == batch and batch > 1 else None
  if batch_axis is None:
    x = x[0]
  if x.shape[-3] == 1:
    return x[..., 0, :, :], batch_axis, None
  return x.reshape(x.shape[:-3] + (num_kv, groups) + x.shape[-2:]), batch_axis, 0


def map_heads(
  head_fn,
  q,
  k,
  v,
  bias,
  vis: Visibility,
  seed,
  *,
  out_axis,
  per_head=(),
  per_row=(),
  rows_in_turn=False,
):
  """Apply ``head_fn(q, k, v, bias, vis, seed, *per_head, *per_row)`` to
  every head.

  q [B, T, H, D], k [B, S, K, D], v [B, S, K, V]; bias [B|1, H|1, T, S] or
  None; ``vis`` batched as its docstring says; seed [B, H] or None; each of
  ``per_head`` is a pytree of [B, K, G, ...], each of ``per_row`` one of
  [B, ...] (the same for every head of a row). The head's results gain axes
  (K, G) at ``out_axis``; the batch axis is prepended. ``rows_in_turn``: the
  rows of the batch run one after another (``lax.map``) instead of as one
  vmap, so loops whose bounds differ by row run each row's own bounds.
  """
  batch, _, num_heads, _ = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  # Heads first inside ([B, K, G, T, D]): each head's rows are contiguous,
  # which is what the per-head matmuls want (notably on CPU).
  q = jnp.moveaxis(q.reshape(q.shape[:2] + (num_kv, groups, q.shape[-1])), 1, 3)
  k, v = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
  bias, bias_b, bias_h = _split_heads(bias, batch, num_kv, groups)
  # Arrays broadcast like the logits (a mask, block states): split per array.
  split = {
    name: _split_heads(x, batch, num_kv, groups)
    for kind in ('logits', 'blocks')
    for name, x in vis.arrays_of(kind).items()
  }
  vis = vis.replace(**{name: x for name, (x, _, _) in split.items()}).map_arrays(
    heads=lambda x: x.reshape((num_kv, groups) + x.shape[1:])
  )
  if seed is not None:
    seed = seed.reshape((batch, num_kv, groups))

  def axes(over_batch: bool):
    """``vis``'s in_axes by kind (``ARRAYS``): per-sequence arrays over the
    batch, per-head ones over heads, logit-shaped ones as split, a step's
    and shared ones not mapped."""
    along = lambda axis: lambda _: axis
    return vis.map_arrays(
      sequence=along(0 if over_batch else None),
      rows=along(0 if over_batch else None),
      cols=along(0 if over_batch else None),
      heads=along(None if over_batch else 0),
      step=along(None),
      shared=along(None),
    ).replace(
      **{name: axes[0 if over_batch else 1] for name, (_, *axes) in split.items()}
    )

  def one_head(q, k, v, bias, vis, seed, extra, row_extra):
    return head_fn(q, k, v, bias, vis, seed, *extra, *row_extra)

  over_groups = jax.vmap(
    one_head,
    in_axes=(0, None, None, bias_h, axes(False), 0, 0, None),
    out_axes=out_axis,
  )
  over_kv = jax.vmap(
    over_groups,
    in_axes=(0, 0, 0, bias_h, axes(False), 0, 0, None),
    out_axes=out_axis,
  )
  in_axes = (0, 0, 0, bias_b, axes(True), 0, 0, 0)
  args = (q, k, v, bias, vis, seed, tuple(per_head), tuple(per_row))
  if not rows_in_turn:
    return jax.vmap(over_kv, in_axes=in_axes, out_axes=0)(*args)
  return lax.map(
    lambda b: over_kv(*_row(in_axes, args, b)), jnp.arange(batch, dtype=jnp.int32)
  )


def _row(in_axes, args, index):
  """Row ``index`` of the arguments that ``in_axes`` batches (on axis 0)."""

  def take(axis, x):
    return x if axis is None else jax.tree.map(lambda leaf: leaf[index], x)

  return jax.tree.map(take, in_axes, args, is_leaf=lambda axis: axis is None)


def grouped_sinks(sinks, batch: int, num_kv: int):
  """``[H]`` -> ``([B, K, G],)``, ``map_heads``' per-head extra; None -> ``()``."""
  if sinks is None:
    return ()
  grouped = sinks.reshape(num_kv, -1)
  return (jnp.broadcast_to(grouped, (batch,) + grouped.shape),)
