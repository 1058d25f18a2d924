"""The operands of a call checked against each other and brought to one
flat batch axis B = prod(B...): query, key, value, a bias or mask broadcast
like the logits, and the sinks."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jattn import _checks, _numerics


def qkv(query, key, value):
  """``(q [B, T, H, D], k [B, S, K, D], v [B, S, K, V] or None, B...)``."""
  _checks.check_array(query, 'query', min_rank=3, layout='[B..., T, H, D]')
  _checks.check_array(key, 'key', min_rank=3, layout='[B..., S, K, D]')
  _checks.check_floating(query, 'query')
  operands = {'query': query, 'key': key}
  if value is not None:
    _checks.check_array(value, 'value', min_rank=3, layout='[B..., S, K, V]')
    operands['value'] = value
  _checks.check_same_dtype(operands)
  _check_positive_dims(query, key, value)
  batch_shape = tuple(query.shape[:-3])
  q_len, heads, head_dim = query.shape[-3:]
  batch = math.prod(batch_shape)
  if key.ndim != query.ndim:
    raise ValueError(
      f'`key` [B..., S, K, D] must have the rank of `query` [B..., T, H, D] '
      f'({query.ndim}); got key {tuple(key.shape)}, query '
      f'{tuple(query.shape)}.'
    )
  k = _flatten_batch(key, batch_shape, batch, 'key', '[B..., S, K, D]')
  kv_len, kv_heads, _ = k.shape[1:]
  _checks.check_dim(
    key, 'key', -1, head_dim, '[B..., S, K, D]', 'D (the head dim of query)'
  )
  if heads % kv_heads:
    raise ValueError(
      f'query heads H={heads} must be a multiple of key/value heads '
      f'K={kv_heads}; got query {tuple(query.shape)}, key {tuple(key.shape)}.'
    )
  v = None
  if value is not None:
    if value.ndim != query.ndim:
      raise ValueError(
        f'`value` [B..., S, K, V] must have rank {query.ndim}; got '
        f'{tuple(value.shape)}.'
      )
    v = _flatten_batch(value, batch_shape, batch, 'value', '[B..., S, K, V]')
    if v.shape[1:3] != (kv_len, kv_heads):
      raise ValueError(
        f'`value` [B..., S, K, V] must match `key` [B..., S, K, D] in S and '
        f'K; got value {tuple(value.shape)}, key {tuple(key.shape)}.'
      )
  q = query.reshape((batch, q_len, heads, head_dim))
  return q, k, v, batch_shape


def logits_arrays(bias, mask, batch_shape, heads: int, q_len: int, kv_len: int):
  """``(bias, mask)``, each broadcastable to ``[B..., H, T, S]``, as
  ``[B|1, H|1, T|1, S|1]`` (None stays None)."""
  if bias is not None:
    _checks.check_array(bias, 'bias', min_rank=0, layout='[B..., H, T, S]')
    _checks.check_floating(bias, 'bias')
    bias = _logits_shaped(bias, 'bias', batch_shape, heads, q_len, kv_len)
  if mask is not None:
    _checks.check_array(mask, 'mask', min_rank=0, layout='[B..., H, T, S]')
    _checks.check_bool(mask, 'mask')
    mask = _logits_shaped(mask, 'mask', batch_shape, heads, q_len, kv_len)

  return bias, mask


def sinks(sinks, heads: int):
  """``[H]`` float32 sink logits (``_numerics.sink_logits``); None stays None."""
  if sinks is not None:
    _checks.check_array(sinks, 'sinks', min_rank=1, layout='[H]')
    _checks.check_floating(sinks, 'sinks')
    _checks.check_shape(sinks, 'sinks', (heads,), '[H] (one logit per query head)')
    sinks = _numerics.sink_logits(sinks)
  return sinks


def _flatten_batch(x, batch_shape, batch: int, name: str, layout: str):
  """[B..., rest] -> [B, rest]."""
  if tuple(x.shape[: len(batch_shape)]) != tuple(batch_shape):
    raise ValueError(
      f'`{name}` {layout}: batch dims must be {tuple(batch_shape)} (those of '
      f'`query`); got shape {tuple(x.shape)}.'
    )
  return x.reshape((batch,) + x.shape[len(batch_shape) :])


def _logits_shaped(x, name, batch_shape, heads, q_len, kv_len):
  """Broadcastable to [B..., H, T, S] -> [B|1, H|1, T|1, S|1]."""
  target = tuple(batch_shape) + (heads, q_len, kv_len)
  layout = '[B..., H, T, S]'
  _checks.check_array(x, name, min_rank=0, layout=layout)
  if x.ndim > len(target):
    raise ValueError(
      f'`{name}` must broadcast to {layout} = {target}; got shape '
      f'{tuple(x.shape)} of higher rank.'
    )
  _checks.check_broadcastable(x, name, target, layout)
  x = jnp.reshape(x, (1,) * (len(target) - x.ndim) + tuple(x.shape))
  nb = len(batch_shape)
  if any(d != 1 for d in x.shape[:nb]):
    x = jnp.broadcast_to(x, target[:nb] + x.shape[nb:])
    return x.reshape((math.prod(batch_shape),) + x.shape[nb:])
  return x.reshape((1,) + x.shape[nb:])


def _check_positive_dims(query, key, value) -> None:
  dims = (
    ('query', query, -1, 'D'),
    ('query', query, -2, 'H'),
    ('key', key, -2, 'K'),
    ('value', value, -1, 'V'),
  )
  for name, x, axis, letter in dims:
    if x is not None and x.shape[axis] == 0:
      raise ValueError(
        f'`{name}`: the {letter} dim must be positive; got shape {tuple(x.shape)}.'
      )
