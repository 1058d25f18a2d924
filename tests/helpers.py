"""Random inputs for the tests, in the shape legend of DESIGN.md."""

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def qkv(
  seed=0,
  *,
  batch=(2,),
  q_len=6,
  kv_len=7,
  heads=4,
  kv_heads=2,
  head_dim=8,
  value_dim=None,
  dtype=jnp.float32,
):
  """query [B..., T, H, D], key [B..., S, K, D], value [B..., S, K, V]."""
  value_dim = head_dim if value_dim is None else value_dim
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  batch = tuple(batch)
  return (
    jax.random.normal(kq, batch + (q_len, heads, head_dim), dtype),
    jax.random.normal(kk, batch + (kv_len, kv_heads, head_dim), dtype),
    jax.random.normal(kv, batch + (kv_len, kv_heads, value_dim), dtype),
  )


def random_mask(seed, shape, p=0.7):
  return jax.random.bernoulli(jax.random.key(seed), p, shape)


def compilations(fn, *args, **kwargs) -> int:
  """How many XLA compilations calling ``fn`` triggers (jax.monitoring)."""
  events = []
  listener = lambda event, *_, **__: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn(*args, **kwargs))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return sum('backend_compile' in event for event in events)


def numpy_attention(q, k, v, scale):
  """The float64 oracle: (out [B, T, H, V], weights [B, H, T, S]) of plain
  softmax attention with GQA (query head h reads KV head h // G)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = scale * np.einsum('bthd,bshd->bhts', q, k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhts,bshv->bthv', weights, v), weights


def oracle_attention(
  q, k, v, *, scale, soft_cap=None, bias=None, score=None, visible=None, sinks=None
):
  """The float64 oracle of every logit feature, in plain NumPy (nothing of
  jattn): ``(out [B, T, H, V], weights [B, H, T, S])`` of

    logits = scale q·k, soft-capped (c·tanh(x / c)), + bias, then
    ``score(logits, b, h, i, j)`` (NumPy, on [B, H, T, S] index grids),
    hidden where ``visible`` [B|1, H|1, T, S] is False; softmax whose
    denominator also holds exp(sinks[h]); rows seeing nothing are zero.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = scale * np.einsum('bthd,bshd->bhts', q, k)
  if soft_cap is not None:
    logits = soft_cap * np.tanh(logits / soft_cap)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if score is not None:
    logits = score(logits, *np.indices(logits.shape))
  if visible is None:
    visible = np.ones(logits.shape, bool)
  visible = np.broadcast_to(np.asarray(visible), logits.shape)
  sink = np.full(logits.shape[:3], -np.inf)
  if sinks is not None:
    sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None], sink.shape)
  top = np.maximum(np.where(visible, logits, -np.inf).max(-1), sink)
  top = np.where(np.isfinite(top), top, 0.0)
  exp = np.where(visible, np.exp(logits - top[..., None]), 0.0)
  total = exp.sum(-1) + np.exp(sink - top)
  weights = np.where(
    total[..., None] > 0, exp / np.where(total > 0, total, 1)[..., None], 0
  )
  return np.einsum('bhts,bshv->bthv', weights, v), weights
