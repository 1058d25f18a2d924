"""``jattn.dot_product_attention``: the one entry point, and its weights.

Shape legend (DESIGN.md): B batch (any number of leading dims), T query
length, S key/value length, H query heads, K key/value heads (G = H // K query
heads share one), D query/key head dim, V value head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn import _core, _flash, _options, _prepare, _reference, _xla

# cuDNN's fused attention (through jax.nn) takes half precision, no dropout,
# segment ids or soft-cap, V == D and head dims up to 128 in multiples of 8.
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _cudnn_fits(p: _prepare.Prepared) -> bool:
  head_dim = p.q.shape[-1]
  return (
    jax.default_backend() == 'gpu'
    and not _xla.unsupported(p)
    and jnp.dtype(p.q.dtype) in _CUDNN_DTYPES
    and head_dim <= 128
    and head_dim % 8 == 0
  )


def choose_implementation(p: _prepare.Prepared, implementation):
  """The auto rule: cuDNN on a GPU when the arguments fit it, else flash."""
  if implementation is not None:
    return implementation
  return 'cudnn' if _cudnn_fits(p) else 'flash'


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  local_window_size: int | tuple[int, int] | None = None,
  logits_soft_cap: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool | None = None,
  implementation: str | None = None,
  block_sizes: tuple[int, int] | None = None,
  return_residual: bool = False,
):
  """Scaled dot-product attention, a drop-in for ``jax.nn.dot_product_attention``.

  ``softmax(soft_cap(scale * Q Kᵀ) + bias, masked) V`` per head, with
  float32 logits and softmax whatever the input dtype.

  Args:
    query: ``[B..., T, H, D]``.
    key: ``[B..., S, K, D]``; K divides H and query head h reads KV head
      ``h // (H // K)`` (GQA; K = 1 is MQA).
    value: ``[B..., S, K, V]``, same dtype as query and key.
    bias: float, broadcastable to ``[B..., H, T, S]``; added to the logits.
    mask: bool, broadcastable to ``[B..., H, T, S]``; True = may attend.
    scale: logit scale, default ``1/sqrt(D)``.
    is_causal: top-left causal mask (query i sees keys 0..i).
    query_seq_lengths: int ``[B...]``; query rows past it return zeros.
    key_value_seq_lengths: int ``[B...]``; keys past it are hidden.
    q_segment_ids: int ``[B..., T]``; queries see only keys of their segment.
    kv_segment_ids: int ``[B..., S]``; defaults to q_segment_ids when T == S.
    local_window_size: ``w`` or ``(left, right)``: query i sees keys
      ``i - left .. i + right``.
    logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)`` (before bias).
    dropout_rate: inverted dropout on the normalised weights, in [0, 1).
    dropout_rng: PRNG key for dropout. Without it (or with rate 0 or
      ``deterministic=True``) no dropout is applied.
    deterministic: None: dropout iff a key is given. False with a rate > 0
      and no key is an error.
    implementation: None (auto: ``'cudnn'`` on a GPU for fp16/bf16 inputs
      without dropout, segment ids or soft-cap, with V == D <= 128, a
      multiple of 8; else ``'flash'``), ``'flash'`` (blockwise, O(T + S)
      memory, custom VJP), ``'reference'`` (the plain single-head function
      vmapped over heads), ``'xla'`` or ``'cudnn'`` (``jax.nn``).
    block_sizes: flash's (query, key) block sizes; default by backend
      (512 x 256 on CPU), shrunk to short sequences.
    return_residual: also return the rows' log-sum-exp of the logits, as
      ``jax.nn.dot_product_attention`` does.

  Returns:
    ``[B..., T, H, V]`` in the query's dtype. A query row with nothing to
    attend to is zero, with finite gradients. With ``return_residual``, a
    pair ``(out, lse)``: ``lse [B..., T, H]`` in the query's dtype, without
    gradient (``-inf`` for rows with nothing to attend to).
  """
  opts = _options.make_options(
    scale=scale,
    is_causal=is_causal,
    local_window_size=local_window_size,
    logits_soft_cap=logits_soft_cap,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
    implementation=implementation,
    block_sizes=block_sizes,
    return_residual=return_residual,
  )
  arrays = _prepare.SequenceArrays(
    query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids
  )
  return _attention_jit(query, key, value, bias, mask, arrays, dropout_rng, opts)


@functools.partial(jax.jit, static_argnames='opts')
def _attention_jit(query, key, value, bias, mask, arrays, dropout_rng, opts):
  p = _prepare.prepare(query, key, value, bias, mask, arrays, dropout_rng, opts)
  if p.empty:  # B, T or S is zero: nothing to compute, rows see no key
    out = jnp.zeros(p.batch_shape + query.shape[-3:-1] + value.shape[-1:], query.dtype)
    lse = jnp.full(out.shape[:-1], -jnp.inf, query.dtype)
    return (out, lse) if opts.return_residual else out
  implementation = choose_implementation(p, opts.implementation)
  if implementation in ('xla', 'cudnn'):
    out, lse = _xla.attention(p, implementation)
  elif implementation == 'flash':
    out, lse = _flash.attention(p, opts.block_sizes)
  else:
    head_fn = functools.partial(_reference.head_attention, p.opts)
    out, lse = _core.map_heads(
      lambda q, k, v, b, m, c: head_fn(c, q, k, v, b, m),
      p.q,
      p.k,
      p.v,
      p.bias,
      p.mask,
      p.ctx,
      out_axis=1,
    )
    lse = lse.reshape(lse.shape[:2] + (-1,))  # [B, T, K, G] -> [B, T, H]
  out = out.reshape(p.batch_shape + query.shape[-3:-1] + (p.v.shape[-1],))
  if not opts.return_residual:
    return out
  return out, lse.reshape(out.shape[:-1]).astype(query.dtype)


def attention_weights(
  query,
  key,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  local_window_size: int | tuple[int, int] | None = None,
  logits_soft_cap: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool | None = None,
):
  """The normalised weights ``[B..., H, T, S]`` (float32) for the same arguments.

  ``dot_product_attention(...) == einsum(weights, value)`` up to rounding;
  rows with nothing to attend to are zero. Materialises ``[T, S]``: use it to
  inspect and plot, not inside a model.
  """
  opts = _options.make_options(
    scale=scale,
    is_causal=is_causal,
    local_window_size=local_window_size,
    logits_soft_cap=logits_soft_cap,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
  )
  arrays = _prepare.SequenceArrays(
    query_seq_lengths, key_value_seq_lengths, q_segment_ids, kv_segment_ids
  )
  return _weights_jit(query, key, bias, mask, arrays, dropout_rng, opts)


@functools.partial(jax.jit, static_argnames='opts')
def _weights_jit(query, key, bias, mask, arrays, dropout_rng, opts):
  p = _prepare.prepare(query, key, None, bias, mask, arrays, dropout_rng, opts)
  if p.empty:
    return jnp.zeros(p.batch_shape + (query.shape[-2], query.shape[-3], key.shape[-3]))
  head_fn = functools.partial(_reference.head_weights, p.opts)
  weights = _core.map_heads(
    lambda q, k, v, b, m, c: head_fn(c, q, k, b, m),
    p.q,
    p.k,
    p.k,
    p.bias,
    p.mask,
    p.ctx,
    out_axis=0,
  )  # [B, K, G, T, S]
  heads = query.shape[-2]
  return weights.reshape(p.batch_shape + (heads,) + weights.shape[-2:])
