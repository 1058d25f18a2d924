"""The decode kernel: few queries against a long key/value cache.

Each query row of a KV group goes through one pass over its KV head: the
logits are a broadcast multiply-and-sum over ``k`` where it lies (``[B, S, K,
D]``, read once for all G query heads that share it, never transposed or
padded), the weighted sum likewise over ``v``; only the small ``[B, S, K,
T·G]`` logits are reshaped. Split-KV (flash-decoding): with ``splits > 1``
the keys are cut into that many chunks, each chunk's partial result
computed independently (in parallel) and the chunks merged by log-sum-exp
(``_numerics.merge``). Masks, offsets, bias, soft-cap, ``score_mod``,
``mask_mod`` and sinks mean what they mean everywhere: the visibility value
and the numerics module answer, per head. Plain JAX: differentiable by
autodiff (the logits are small when T is).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn import _mods, _numerics
from jattn._heads import map_heads
from jattn._types import Prepared

# Query rows per KV head (T·G) the kernel takes: it holds [T·G, S] logits.
MAX_ROWS = 64
# The automatic choice takes it for keys at least this long (shorter ones
# are flash's: a block or two).
MIN_KEYS = 1024
# Key chunks processed in parallel (split-KV), by backend: a CPU's few cores
# are busy with one pass; a GPU wants B·K·splits programs.
SPLITS = {'cpu': 1, 'gpu': 16, 'tpu': 8}


def _per_head(p: Prepared, capped):
  """``capped [B, K, G, T, S]`` float32 logits + bias, through the
  score_mod, ``-inf`` where hidden: each head's, as the visibility value and
  the score_mod see it."""
  q_len, kv_len = p.q.shape[1], p.k.shape[1]
  tiny = p.q[..., :0], p.k[..., :0]  # map_heads reads the heads off these

  def head(q, k, v, bias, vis, seed, capped):
    score = functools.partial(
      _mods.score_block, p.score_mod, indices=vis.mod_indices(0, 0, q_len, kv_len)
    )
    return _numerics.finish_logits(
      capped, bias, score, vis.elements(0, 0, q_len, kv_len)
    )

  return map_heads(
    head, *tiny, tiny[1], p.bias, p.vis, None, out_axis=0, per_head=(capped,)
  )


def _head_free(p: Prepared) -> bool:
  """Whether every head of a row sees the same keys with the same logits
  (then the visibility value is asked once per row, not per head)."""
  return p.bias is None and p.score_mod is None and not p.vis.differs_by_head


def _row_visible(p: Prepared):
  """``[B, T, S]`` bool: the keys each query row sees, asked of one head."""
  q_len, kv_len = p.q.shape[1], p.k.shape[1]
  one = p.q[:, :, :1, :0], p.k[:, :, :1, :0]  # one head, no features
  vis = p.vis.replace(head_index=p.vis.head_index[:1])

  def head(q, k, v, bias, vis, seed):
    visible = vis.elements(0, 0, q_len, kv_len)
    return jnp.ones((q_len, kv_len), bool) if visible is None else visible

  return map_heads(head, *one, one[1], None, vis, None, out_axis=0)[:, 0, 0]


def _logits(p: Prepared, rows, k):
  """``[B, S, K, R]`` float32 logits (scale, soft-cap, bias, score_mod,
  hidden keys) of ``rows [B, K, R, D]`` (R = T·G, ordered (t, g)) against
  ``k [B, S, K, D]``, read where it lies."""
  q_len = p.q.shape[1]
  rows = rows.astype(jnp.float32)
  if p.kv_heads_first:  # keys stored [B, K, S, D]: a batched matrix product
    dots = jnp.einsum('bkrd,bksd->bskr', rows, _heads_first(k).astype(jnp.float32))
  else:
    dots = _rows_times(k.astype(jnp.float32), rows, -1)
  logits = _numerics.scores(p.opts, dots)  # [B, S, K, R]
  per_head = logits.reshape(logits.shape[:3] + (q_len, -1))  # [B, S, K, T, G]
  if _head_free(p):
    visible = jnp.swapaxes(_row_visible(p), 1, 2)[:, :, None, :, None]
    return _numerics.finish_logits(per_head, visible=visible).reshape(logits.shape)
  per_head = _per_head(p, jnp.transpose(per_head, (0, 2, 4, 3, 1)))  # [B, K, G, T, S]
  return jnp.transpose(per_head, (0, 4, 1, 3, 2)).reshape(logits.shape)


def _rows_times(cache, rows, axis: int):
  """A broadcast multiply-and-sum over ``cache [B, s, K, X]`` that reads it
  once: ``axis=-1``, ``rows [B, K, R, X]`` -> ``[B, s, K, R]`` (logits);
  ``axis=1``, ``rows [B, s, K, R]`` (weights) -> ``[B, K, R, X]``. One row
  (R = 1) runs without its unit axis, which XLA's CPU reductions are slow
  with (measured with benchmarks/decode.py)."""
  if axis == -1:
    if rows.shape[2] > 1:
      return (cache[:, :, :, None] * rows[:, None]).sum(-1)
    dim = cache.shape[-1]
    split = (8, dim // 8) if dim % 8 == 0 else (dim,)  # two short sums: faster
    products = cache.reshape(cache.shape[:3] + split) * rows.reshape(
      rows.shape[:1] + (1, rows.shape[1]) + split
    )
    return products.sum(tuple(range(3, products.ndim)))[..., None]
  if rows.shape[3] == 1:
    return (rows * cache).sum(1)[:, :, None]
  return (rows[..., None] * cache[:, :, :, None]).sum(1)


def _heads_first(x):
  """``[B, S, K, X]`` seen as ``[B, K, S, X]``: under jit, of keys or values
  stored head-major (``Prepared.kv_heads_first``), the two transposes cancel
  and the storage is read where it lies."""
  return jnp.swapaxes(x, 1, 2)


def _partial(logits, v, heads_first: bool):
  """One chunk of keys: ``(out [B, K, R, V], m, total [B, K, R])`` from
  ``logits [B, s, K, R]`` and ``v [B, s, K, V]`` (stored head-major when
  ``heads_first``); ``out`` normalised by its own ``total``."""
  shape = logits.shape
  flat = logits.reshape(shape[:2] + (-1,))  # [B, s, K·R]: no unit axis
  m = flat.max(axis=1)
  p = jnp.exp(flat - _numerics.finite_or_zero(m)[:, None])
  total = p.sum(axis=1).reshape(shape[:1] + shape[2:])
  weights = p.reshape(shape)
  if heads_first:
    v = _heads_first(v).astype(jnp.float32)
    weighted = jnp.einsum('bskr,bksv->bkrv', weights, v)
  else:
    weighted = _rows_times(v.astype(jnp.float32), weights, 1)  # [B, K, R, V]
  m = m.reshape(total.shape)
  return _numerics.normalize(weighted, total), m, total


def decode_attention(p: Prepared, splits: int):
  """``(out [B, T, H, V], lse [B, T, H])`` of the prepared call, the keys
  in ``splits`` chunks."""
  batch, q_len, heads, head_dim = p.q.shape
  kv_len, num_kv = p.k.shape[1:3]
  groups = heads // num_kv
  rows = p.q.reshape(batch, q_len, num_kv, groups, head_dim)
  rows = jnp.moveaxis(rows, 1, 2).reshape(batch, num_kv, q_len * groups, head_dim)
  logits = _logits(p, rows, p.k)  # [B, S, K, R]
  chunk = kv_len // splits
  parts = [
    _partial(
      jax.lax.slice_in_dim(logits, i * chunk, (i + 1) * chunk, axis=1),
      jax.lax.slice_in_dim(p.v, i * chunk, (i + 1) * chunk, axis=1),
      p.kv_heads_first,
    )
    for i in range(splits)
  ]
  if p.sinks is not None:  # the sinks' key: a zero value, logit sinks[h]
    sink = jnp.tile(p.sinks.reshape(num_kv, 1, groups), (1, q_len, 1))
    rows = (batch, num_kv, q_len * groups)
    parts.append(_numerics.start(rows, p.v.shape[-1], sink.reshape(num_kv, -1)))
  out, m, total = functools.reduce(_numerics.merge, parts)  # [B, K, R, ...]
  lse = _numerics.log_sum_exp(m, total).reshape(batch, num_kv, q_len, groups)
  out = out.reshape(batch, num_kv, q_len, groups, -1)
  out = jnp.moveaxis(out, 2, 1).reshape(batch, q_len, heads, -1)
  lse = jnp.moveaxis(lse, 2, 1).reshape(batch, q_len, heads)
  return out.astype(p.q.dtype), lse


def split_count(kv_len: int, backend: str) -> int:
  """The largest power of 2 up to the backend's ``SPLITS`` that divides S
  into chunks of at least 128 keys."""
  splits = SPLITS.get(backend, 1)
  while splits > 1 and (kv_len % splits or kv_len // splits < 128):
    splits //= 2
  return splits


class Decode:
  """The kernel contract (see ``_registry``): few query rows per KV head."""

  name = 'decode'
  lse_gradient = True

  def supports(self, p: Prepared) -> list[str]:
    reasons = []
    rows = p.q.shape[1] * (p.q.shape[2] // p.k.shape[2])
    if rows > MAX_ROWS:
      reasons.append(
        f'T·G = {rows} query rows per KV head (decode holds their [T·G, S] '
        f'logits: at most {MAX_ROWS})'
      )
    if p.opts.dropout_rate > 0.0:
      reasons.append('dropout (an inference kernel)')
    return reasons

  def preferred(self, p: Prepared) -> bool:
    """Whether the automatic choice should take a call it supports."""
    return p.k.shape[1] >= MIN_KEYS

  def __call__(self, p: Prepared):
    return decode_attention(p, split_count(p.k.shape[1], p.backend))
