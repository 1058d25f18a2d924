"""How logits become weights: the float32 softmax every kernel shares.

A row's softmax statistics are ``(m, total)``: the largest visible logit and the
sum of ``exp(logit - m)``. They are kept apart rather than folded into one
log-sum-exp, because at the magnitude of an additive mask (``-1e9``, ``-1e30``,
``finfo.min``) ``m + log(total)`` rounds ``log(total)`` away, and weights recomputed
from it would be ``total`` times too large. A row whose every logit is hidden (or
``-inf``) has ``m = -inf`` and ``total = 0``: its weights and output are zero, and
its gradients are zero too, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def matmul(subscripts: str, a, b):
  """einsum with float32 results; half-precision operands on CPU (and mixed
  operands anywhere) go float32.

  XLA's CPU dot does not take every bf16 x bf16 -> f32 shape, and it has no
  fast half-precision path to lose; GPUs and TPUs keep the half inputs.
  """
  if jax.default_backend() == 'cpu' or a.dtype != b.dtype:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


# The logits pipeline, in the documented order: ``scale · q.k``, soft-cap,
# ``+ bias``, the score_mod, then the masks. Every kernel forms its logits
# with it, whatever layout it holds the products ``q.k`` in.


def scores(opts, dots):
  """``soft_cap(scale · dots)`` in float32, for products ``q.k`` of any shape."""
  logits = dots.astype(jnp.float32) * jnp.float32(opts.scale)
  if opts.soft_cap is not None:
    cap = jnp.float32(opts.soft_cap)
    logits = cap * jnp.tanh(logits / cap)
  return logits


def finish_logits(capped, bias=None, score=None, visible=None):
  """The rest of the pipeline after ``scores``: ``+ bias``, then ``score``
  (the call's score_mod at these indices, a function of the logits; None:
  none), then ``-inf`` where not ``visible`` (None: all seen)."""
  logits = capped if bias is None else capped + bias.astype(jnp.float32)
  logits = logits if score is None else score(logits)
  return hide(logits, visible)


def capped_logits(opts, q, k):
  """``q [t, D], k [s, D] -> [t, s]`` float32 ``soft_cap(scale q.k)``."""
  return scores(opts, matmul('td,sd->ts', q, k))


def block_logits(opts, q, k, bias=None, score=None, visible=None):
  """``q [t, D], k [s, D] -> [t, s]`` float32 logits, the whole pipeline."""
  return finish_logits(capped_logits(opts, q, k), bias, score, visible)


def soft_cap_grad(opts, d_logits, capped):
  """The gradient through the soft-cap, given its output ``capped``."""
  if opts.soft_cap is None:
    return d_logits
  return d_logits * (1.0 - jnp.square(capped / opts.soft_cap))


def hide(logits, visible):
  """``logits`` with hidden entries at ``-inf`` (``visible`` None: all seen)."""
  return logits if visible is None else jnp.where(visible, logits, -jnp.inf)


def finite_or_zero(m):
  """A row max usable as a shift: ``-inf`` (nothing visible) becomes 0."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def with_sink(logits, sink):
  """``[t, s]`` logits and the sink's column ``[t, s + 1]`` (None: as they are)."""
  if sink is None:
    return logits
  column = jnp.broadcast_to(sink.astype(jnp.float32), logits.shape[:-1] + (1,))
  return jnp.concatenate([logits, column], axis=-1)


def softmax(logits, visible=None):
  """float32 softmax over the last axis; rows with nothing visible -> zeros.

  Hidden logits never reach an ``exp`` that could overflow, and empty rows
  get zero weights with zero (finite) gradients.
  """
  logits = hide(logits.astype(jnp.float32), visible)
  m = jax.lax.stop_gradient(finite_or_zero(jnp.max(logits, axis=-1, keepdims=True)))
  unnormalized = jnp.exp(logits - m)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  return unnormalized / jnp.where(total > 0, total, 1.0)


def sink_logits(sinks):
  """``sinks [H]`` as float32 logits with ``+inf`` made the largest finite
  float: a sink that takes every weight (outputs and gradients zero), not a
  NaN. None stays None."""
  if sinks is None:
    return None
  return jnp.minimum(sinks.astype(jnp.float32), jnp.finfo(jnp.float32).max)


def start(rows, value_dim: int, sink=None):
  """``(out [*rows, V], m, total)``: the partial result of rows that have
  seen nothing yet, or only the attention sink (``initial_stats``). Every
  fast path starts from it and merges or folds its keys in: this is where
  sinks enter."""
  m, total = initial_stats(rows, sink)
  return jnp.zeros(m.shape + (value_dim,), jnp.float32), m, total


def initial_stats(rows, sink=None):
  """``(m, total)`` of rows (a count or a shape) that have seen nothing yet,
  or only the attention sink: a key with logit ``sink`` (broadcast to the
  rows) and a zero value (a ``-inf`` sink is none)."""
  if sink is None:
    sink = jnp.float32(-jnp.inf)
  shape = (rows,) if isinstance(rows, int) else tuple(rows)
  m = jnp.broadcast_to(sink.astype(jnp.float32), shape)
  return m, jnp.where(m > -jnp.inf, 1.0, 0.0).astype(jnp.float32)


def delta(out, d_out, d_lse=None):
  """``[..., t]``: each row's ``d_out · out - d_lse``, what the backward
  subtracts from ``d_out · v`` (softmax's Jacobian; a row's log-sum-exp
  moves with every weight, by the weight)."""
  rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  return rows if d_lse is None else rows - d_lse.astype(jnp.float32)


def sink_grad(sink, m, total, delta):
  """Each row's share of d loss / d sink: ``-weight · delta`` (``delta``
  above), where ``weight = exp(sink - lse)`` is the sink's softmax weight,
  from the rows' final statistics (sink included). Broadcasts: ``sink``
  against ``m``, ``total`` and ``delta`` ``[..., t]``."""
  weight = jnp.where(total > 0, jnp.exp(sink - finite_or_zero(m)), 0.0)
  return -weight * delta / jnp.where(total > 0, total, 1.0)


def online_update(m, total, logits):
  """Fold a block of ``[t, s]`` logits (hidden = -inf) into ``(m [t], total [t])``.

  Returns ``(m, total, p, correction)``: the new statistics, the block's
  unnormalised weights ``exp(logits - m)`` and the factor by which
  everything accumulated before the block must be rescaled.
  """
  m_new = jnp.maximum(m, logits.max(axis=-1))
  shift = finite_or_zero(m_new)
  p = jnp.exp(logits - shift[:, None])
  correction = jnp.exp(m - shift)
  return m_new, total * correction + p.sum(axis=-1), p, correction


def normalize(acc, total):
  """``acc [t, V] / total [t]``; rows with ``total == 0`` (nothing visible) are zero."""
  return acc / jnp.where(total > 0, total, 1.0)[..., None]


def unnormalized(logits, m):
  """``exp(logits - m)`` for ``[t, s]`` logits and their rows' max ``m [t]``:
  the forward's weights times their row sum (zero where hidden)."""
  return jnp.exp(logits - finite_or_zero(m)[:, None])


def inverse_total(total):
  """``1 / total`` per row; 0 for rows that saw nothing (their weights are 0).

  The backward scales ``d_out`` rows by it once, so each block's weights are
  ``unnormalized`` without a division: exact at any logit magnitude.
  """
  return jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)


def merge(a, b):
  """Two partial results ``(out, m, total)`` over disjoint keys -> their union.

  ``out [..., t, V]`` are normalised by their own ``total``; ``m``, ``total`` are
  ``[..., t]``. This is how a ring (or a split-KV decode) joins key chunks.
  """
  (out_a, m_a, total_a), (out_b, m_b, total_b) = a, b
  m = jnp.maximum(m_a, m_b)
  shift = finite_or_zero(m)
  w_a = total_a * jnp.exp(m_a - shift)
  w_b = total_b * jnp.exp(m_b - shift)
  total = w_a + w_b
  out = out_a.astype(jnp.float32) * w_a[..., None]
  out = normalize(out + out_b.astype(jnp.float32) * w_b[..., None], total)
  return out, m, total


def log_sum_exp(m, total):
  """``log(sum(exp(logits)))`` per row; ``-inf`` for rows that saw nothing."""
  return jnp.where(
    total > 0, finite_or_zero(m) + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf
  )


def _fmix32(x):
  """MurmurHash3's 32-bit finaliser: a cheap, well-mixed integer hash."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_keep(seed, rows, cols, rate: float):
  """``[t, s]`` keep mask, a pure function of (seed, row, col).

  Any blocking of the same matrix regenerates the same mask, so a blockwise
  forward and backward agree with each other and with the reference.
  """
  row_hash = _fmix32(seed + rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B1))
  col_code = cols.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F)
  bits = _fmix32(row_hash[:, None] ^ col_code[None, :])
  threshold = np.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  return bits >= threshold


def dropout(x, keep, rate: float):
  """Inverted dropout: kept entries scaled by ``1 / (1 - rate)``."""
  if keep is None:
    return x
  return jnp.where(keep, x / (1.0 - rate), 0.0)
