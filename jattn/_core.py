"""What every kernel shares: options, per-sequence context, block math, head vmap.

A kernel is a single-head, unbatched function over ``q [T, D]``, ``k [S, D]``,
``v [S, V]``; ``map_heads`` vmaps it over KV groups, KV heads and batch. The
helpers here evaluate logits, visibility and dropout for any block of rows and
columns, so the reference (one block) and flash (many) agree by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn import masks
from jattn._options import Options


class Context(NamedTuple):
  """Per-sequence arrays (for one batch element inside the vmap).

  q_len/kv_len: scalar valid lengths; q_seg [T] / kv_seg [S]: segment ids;
  seed: uint32 scalar for dropout. Any of them may be None.
  """

  q_len: jnp.ndarray | None = None
  kv_len: jnp.ndarray | None = None
  q_seg: jnp.ndarray | None = None
  kv_seg: jnp.ndarray | None = None
  seed: jnp.ndarray | None = None


def matmul(subscripts: str, a, b):
  """einsum with float32 results; half-precision operands on CPU go float32.

  XLA's CPU dot does not take every bf16 x bf16 -> f32 shape, and it has no
  fast half-precision path to lose; GPUs and TPUs keep the half inputs.
  """
  if jax.default_backend() == 'cpu':
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def block_logits(opts: Options, q, k, bias=None):
  """``q [t, D], k [s, D], bias [t, s] -> [t, s]`` float32 logits.

  ``soft_cap * tanh(scale q.k / soft_cap) + bias``.
  """
  logits = matmul('td,sd->ts', q, k)
  logits = logits * jnp.float32(opts.scale)
  if opts.soft_cap is not None:
    cap = jnp.float32(opts.soft_cap)
    logits = cap * jnp.tanh(logits / cap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  return logits


def block_visible(opts: Options, ctx: Context, rows, cols, mask=None):
  """Which ``[t, s]`` pairs may attend (rows/cols are absolute positions).

  Returns None when everything is visible, so callers skip the select.
  """
  conditions = [mask]
  if opts.is_causal:
    conditions.append(masks.causal_from_positions(rows, cols))
  if opts.window is not None:
    conditions.append(masks.window_from_positions(rows, cols, opts.window))
  if ctx.q_len is not None:
    conditions.append((rows < ctx.q_len)[:, None])
  if ctx.kv_len is not None:
    conditions.append((cols < ctx.kv_len)[None, :])
  if ctx.q_seg is not None:
    conditions.append(ctx.q_seg[:, None] == ctx.kv_seg[None, :])
  return masks.combine_masks(*conditions)


def map_heads(
  head_fn, q, k, v, bias, mask, ctx: Context, *, out_axis: int, per_head=()
):
  """Apply ``head_fn(q [T,D], k [S,D], v [S,V], bias, mask, ctx, *extra)``
  to every head.

  q [B, T, H, D], k [B, S, K, D], v [B, S, K, V]; bias/mask [B|1, H|1, T, S]
  or None; ctx fields [B, ...] except seed [B, H]; each of ``per_head`` is
  [B, K, G, ...]. Query head h reads KV head h // G. The head's results gain
  axes (K, G) at ``out_axis``; the batch axis is prepended.
  """
  batch, _, num_heads, _ = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  # Heads first inside ([B, K, G, T, D]): each head's rows are contiguous,
  # which is what the per-head matmuls want (notably on CPU).
  q = jnp.moveaxis(q.reshape(q.shape[:2] + (num_kv, groups, q.shape[-1])), 1, 3)
  k = jnp.moveaxis(k, 1, 2)
  v = jnp.moveaxis(v, 1, 2)

  def split_heads(x):
    """[B|1, H|1, T, S] -> (array, batch axis, head axis) for the vmaps."""
    if x is None:
      return None, None, None
    batch_axis = 0 if x.shape[0] == batch and batch > 1 else None
    if batch_axis is None:
      x = x[0]
    heads = x.shape[-3]
    x = (
      x[..., 0, :, :]
      if heads == 1
      else x.reshape(x.shape[:-3] + (num_kv, groups) + x.shape[-2:])
    )
    return x, batch_axis, (None if heads == 1 else 0)

  bias, bias_b, bias_h = split_heads(bias)
  mask, mask_b, mask_h = split_heads(mask)
  seed = ctx.seed
  if seed is not None:
    seed = seed.reshape((batch, num_kv, groups))

  def per_head_fn(q_h, k_h, v_h, bias_h_, mask_h_, seed_h, c, extra):
    return head_fn(q_h, k_h, v_h, bias_h_, mask_h_, c._replace(seed=seed_h), *extra)

  over_groups = jax.vmap(
    per_head_fn,
    in_axes=(0, None, None, bias_h, mask_h, 0, None, 0),
    out_axes=out_axis,
  )
  over_kv = jax.vmap(
    over_groups,
    in_axes=(0, 0, 0, bias_h, mask_h, 0, None, 0),
    out_axes=out_axis,
  )
  over_batch = jax.vmap(over_kv, in_axes=(0, 0, 0, bias_b, mask_b, 0, 0, 0), out_axes=0)
  return over_batch(q, k, v, bias, mask, seed, ctx._replace(seed=None), tuple(per_head))
