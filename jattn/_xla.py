"""Delegation to ``jax.nn.dot_product_attention`` where its arguments fit.

XLA's path (and cuDNN on a GPU) knows causal, window, lengths, mask, bias and
GQA, but not segment ids, soft-capping or dropout, and needs V == D. Its
fully-masked rows return the mean of V; here they are zeroed, as everywhere in
jattn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import _prepare, masks


def unsupported(p: _prepare.Prepared, implementation: str = 'xla') -> list[str]:
  """The arguments ``jax.nn.dot_product_attention`` cannot take."""
  reasons = []
  backend = jax.default_backend()
  if implementation == 'cudnn' and backend != 'gpu':
    reasons.append(f'the {backend!r} backend (cuDNN needs an NVIDIA GPU)')
  if p.ctx.q_seg is not None:
    reasons.append('segment ids')
  if p.opts.soft_cap is not None:
    reasons.append('logits_soft_cap')
  if p.opts.dropout_rate > 0.0:
    reasons.append('dropout')
  if p.v is not None and p.v.shape[-1] != p.k.shape[-1]:
    reasons.append(f'value head dim V={p.v.shape[-1]} != D={p.k.shape[-1]}')
  return reasons


def _rows_with_keys(p: _prepare.Prepared, mask):
  """[B|1, T, H|1, 1] bool: rows that see at least one key (None: all do)."""
  if mask is None and p.opts.window is None and p.ctx.kv_len is None:
    return None  # top-left causal alone never empties a row
  q_len, kv_len = p.q.shape[1], p.k.shape[1]
  visible = masks.combine_masks(
    mask,
    None
    if p.opts.window is None
    else masks.local_window_mask(q_len, kv_len, p.opts.window),
    None if not p.opts.is_causal else masks.causal_mask(q_len, kv_len),
    None
    if p.ctx.kv_len is None
    else masks.padding_mask(None, p.ctx.kv_len, q_len, kv_len),
  )
  visible = visible.reshape((1,) * (4 - visible.ndim) + visible.shape)
  visible = jnp.broadcast_to(visible, visible.shape[:-2] + (q_len, kv_len)).any(axis=-1)
  return jnp.swapaxes(visible, -1, -2)[..., None]


def _bias_and_mask(p: _prepare.Prepared):
  """(bias, mask) for jax.nn: a ``-inf`` bias entry becomes a hidden key.

  jax.nn adds the bias after masking with a finite large negative, so a row
  of ``-inf`` bias would be NaN there; here it is a row with nothing to see.
  """
  if p.bias is None:
    return None, p.mask
  bias = p.bias.astype(jnp.float32)
  hidden = bias == -jnp.inf
  return jnp.where(hidden, 0.0, bias), masks.combine_masks(p.mask, ~hidden)


def attention(p: _prepare.Prepared, implementation: str):
  """``(out [B, T, H, V], lse [B, T, H] float32)`` through
  ``jax.nn.dot_product_attention``."""
  reasons = unsupported(p, implementation)
  if reasons:
    raise ValueError(
      f'implementation={implementation!r} (jax.nn.dot_product_attention) '
      f'does not support: {", ".join(reasons)}. Use implementation='
      "'flash', 'reference' or None."
    )
  as_int32 = lambda x: None if x is None else x.astype(jnp.int32)
  bias, mask = _bias_and_mask(p)
  # jax.nn lowers bf16/fp16 dots with an algorithm preset that breaks under
  # jax_numpy_dtype_promotion='strict' (forward and backward); float32 inputs
  # avoid it and give the float32 accuracy jattn promises anyway.
  q, k, v = p.q, p.k, p.v
  if implementation == 'xla':
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  out, lse = jax.nn.dot_product_attention(
    q,
    k,
    v,
    bias,
    mask,
    scale=p.opts.scale,
    is_causal=p.opts.is_causal,
    query_seq_lengths=as_int32(p.ctx.q_len),
    key_value_seq_lengths=as_int32(p.ctx.kv_len),
    local_window_size=p.opts.window,
    implementation=implementation,
    return_residual=True,
  )
  out, lse = out.astype(p.q.dtype), lse.astype(jnp.float32)
  rows = _rows_with_keys(p, mask)
  if rows is not None:
    out = jnp.where(rows, out, jnp.zeros((), out.dtype))
    lse = jnp.where(rows[..., 0], lse, -jnp.inf)
  return out, lse
