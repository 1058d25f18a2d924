"""The reference kernel: one head, the whole ``[T, S]`` logits at once.

Plain and obviously right; every other implementation is tested against it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jattn import _mods, _numerics
from jattn._heads import grouped_sinks, map_heads
from jattn._types import Prepared


def _hidden_logits(opts, q, k, bias, vis, score_mod):
  """``[T, S]`` float32 logits (the score_mod applied), ``-inf`` where the
  key is hidden."""
  rows, cols = q.shape[0], k.shape[0]
  score = functools.partial(
    _mods.score_block, score_mod, indices=vis.mod_indices(0, 0, rows, cols)
  )
  return _numerics.block_logits(opts, q, k, bias, score, vis.elements(0, 0, rows, cols))


def _dropout(opts, vis, seed, weights):
  if opts.dropout_rate == 0.0:
    return weights
  rows, cols = vis.indices(0, 0, *weights.shape)
  keep = _numerics.dropout_keep(seed, rows, cols, opts.dropout_rate)
  return _numerics.dropout(weights, keep, opts.dropout_rate)


def _softmax(logits, sink):
  """Weights ``[T, S]``; a sink joins each row's denominator, then leaves."""
  weights = _numerics.softmax(_numerics.with_sink(logits, sink))
  return weights if sink is None else weights[:, :-1]


def head_weights(opts, score_mod, q, k, bias, vis, seed, sink=None):
  """``q [T, D], k [S, D] -> [T, S]`` float32 weights, dropout applied."""
  weights = _softmax(_hidden_logits(opts, q, k, bias, vis, score_mod), sink)
  return _dropout(opts, vis, seed, weights)


def head_attention(opts, score_mod, q, k, v, bias, vis, seed, sink=None):
  """``q [T, D], k [S, D], v [S, V] -> (out [T, V], lse [T])``.

  ``out`` has the query's dtype; the weighted sum is taken in float32 too:
  the reference is the most precise path, and the others are measured
  against it. ``lse`` is the rows' float32 log-sum-exp, the sink included
  (``-inf`` when empty).
  """
  logits = _hidden_logits(opts, q, k, bias, vis, score_mod)
  weights = _dropout(opts, vis, seed, _softmax(logits, sink))
  logits = _numerics.with_sink(logits, sink)
  out = jnp.einsum('ts,sv->tv', weights, v.astype(jnp.float32))
  m = jnp.max(logits, axis=-1)
  total = _numerics.unnormalized(logits, m).sum(axis=-1)
  return out.astype(q.dtype), _numerics.log_sum_exp(m, total)


def weights(p: Prepared):
  """``[B, H, T, S]`` float32 weights of every head."""
  head = lambda q, k, v, bias, vis, seed, *sink: head_weights(
    p.opts, p.score_mod, q, k, bias, vis, seed, *sink
  )
  out = _each_head(p, head, p.k, out_axis=0)
  return out.reshape(out.shape[:1] + (-1,) + out.shape[-2:])  # [B, K, G, ..]


def _each_head(p: Prepared, head, value, *, out_axis):
  """``head`` over every head of ``p`` (its sink, if any, as the last argument)."""
  sinks = grouped_sinks(p.sinks, p.q.shape[0], p.k.shape[2])
  return map_heads(
    head, p.q, p.k, value, p.bias, p.vis, p.seed, out_axis=out_axis, per_head=sinks
  )


class Reference:
  """The kernel contract (see ``_registry``): takes every call."""

  name = 'reference'
  lse_gradient = True

  def supports(self, p: Prepared) -> list[str]:
    return []

  def __call__(self, p: Prepared):
    head = functools.partial(head_attention, p.opts, p.score_mod)
    out, lse = _each_head(p, head, p.v, out_axis=1)
    # [B, T, K, G, V] -> [B, T, H, V]; [B, T, K, G] -> [B, T, H]
    return out.reshape(out.shape[:2] + (-1, out.shape[-1])), lse.reshape(
      lse.shape[:2] + (-1,)
    )
