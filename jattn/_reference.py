"""The reference kernel: one head, the whole ``[T, S]`` logits at once.

Plain and obviously right; every other implementation is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import _core, _numerics


def _hidden_logits(opts: _core.Options, ctx: _core.Context, q, k, bias, mask):
  """``[T, S]`` float32 logits, ``-inf`` where the key is hidden."""
  rows, cols = jnp.arange(q.shape[0]), jnp.arange(k.shape[0])
  logits = _core.block_logits(opts, q, k, bias)
  return _numerics.hide(logits, _core.block_visible(opts, ctx, rows, cols, mask))


def _dropout(opts: _core.Options, ctx: _core.Context, weights):
  if opts.dropout_rate == 0.0:
    return weights
  rows, cols = jnp.arange(weights.shape[0]), jnp.arange(weights.shape[1])
  keep = _numerics.dropout_keep(ctx.seed, rows, cols, opts.dropout_rate)
  return _numerics.dropout(weights, keep, opts.dropout_rate)


def head_weights(opts: _core.Options, ctx: _core.Context, q, k, bias, mask):
  """``q [T, D], k [S, D] -> [T, S]`` float32 weights, dropout applied."""
  return _dropout(
    opts, ctx, _numerics.softmax(_hidden_logits(opts, ctx, q, k, bias, mask))
  )


def head_attention(opts: _core.Options, ctx: _core.Context, q, k, v, bias, mask):
  """``q [T, D], k [S, D], v [S, V] -> (out [T, V], lse [T])``.

  ``out`` has the query's dtype; the weighted sum is taken in float32 too:
  the reference is the most precise path, and the others are measured
  against it. ``lse`` is the rows' float32 log-sum-exp (``-inf`` when empty).
  """
  logits = _hidden_logits(opts, ctx, q, k, bias, mask)
  weights = _dropout(opts, ctx, _numerics.softmax(logits))
  out = jnp.einsum('ts,sv->tv', weights, v.astype(jnp.float32))
  m = jnp.max(logits, axis=-1)
  total = jnp.sum(jnp.exp(logits - _numerics.finite_or_zero(m)[:, None]), axis=-1)
  return out.astype(q.dtype), jax.lax.stop_gradient(_numerics.log_sum_exp(m, total))
