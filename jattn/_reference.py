"""The reference kernel: one head, the whole ``[T, S]`` logits at once.

Plain and obviously right; every other implementation is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import _core


def masked_softmax(logits, visible):
  """float32 softmax over the last axis; rows with nothing visible -> zeros.

  The max is taken over visible entries only and the exponent of hidden
  entries is selected away, so hidden logits never reach an ``exp`` that could
  overflow and empty rows get zero weights and zero (finite) gradients.
  """
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  unnormalized = jnp.exp(logits - row_max)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  return unnormalized / jnp.where(total > 0, total, 1.0)


def head_weights(opts: _core.Options, ctx: _core.Context, q, k, bias, mask):
  """``q [T, D], k [S, D] -> [T, S]`` float32 weights, dropout applied."""
  rows = jnp.arange(q.shape[0])
  cols = jnp.arange(k.shape[0])
  logits = _core.block_logits(opts, q, k, bias)
  weights = masked_softmax(logits, _core.block_visible(opts, ctx, rows, cols, mask))
  if opts.dropout_rate > 0.0:
    keep = _core.dropout_keep(ctx.seed, rows, cols, opts.dropout_rate)
    weights = jnp.where(keep, weights / (1.0 - opts.dropout_rate), 0.0)
  return weights


def head_attention(opts: _core.Options, ctx: _core.Context, q, k, v, bias, mask):
  """``q [T, D], k [S, D], v [S, V] -> [T, V]`` in the query's dtype.

  The weighted sum is taken in float32 too: the reference is the most
  precise path, and the others are measured against it.
  """
  weights = head_weights(opts, ctx, q, k, bias, mask)
  out = jnp.einsum('ts,sv->tv', weights, v.astype(jnp.float32))
  return out.astype(q.dtype)
