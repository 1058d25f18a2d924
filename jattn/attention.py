"""``jattn.dot_product_attention``: the one entry point, and its weights.

Shape legend (DESIGN.md): B batch (any number of leading dims), T query
length, S key/value length, H query heads, K key/value heads (G = H // K query
heads share one), D query/key head dim, V value head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jattn import _call, _prepare, _reference, _registry
from jattn._types import Prepared


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
  attention_chunk_size: int | None = None,
  prefix_lengths=None,
  q_offsets=None,
  kv_offsets=None,
  logits_soft_cap: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool | None = None,
  implementation: str | None = None,
  block_sizes: tuple[int, int] | None = None,
  return_residual: bool = False,
  sinks=None,
  mask_mod=None,
  score_mod=None,
  block_mask=None,
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
    attention_chunk_size: ``C``: query i sees only keys of its own chunk
      (``i // C == j // C``); with ``is_causal``, Llama 4's chunked attention.
    prefix_lengths: int ``[B...]``, with ``is_causal``: prefix-LM attention,
      query i sees key j when ``j <= i`` or ``j < prefix_length``.
    q_offsets: int ``[B...]``, the position of each sequence's first query
      (default 0): query row i is at position ``q_offsets + i``.
    kv_offsets: int ``[B...]``, the position of each sequence's first key
      (default 0). The causal, window, chunk and prefix rules compare
      positions; lengths count rows and columns from the first. For one
      new token at position p against a cache of keys at positions 0..S-1:
      ``q_offsets=p`` with ``is_causal=True`` sees keys 0..p.
    logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)`` (before bias).
    dropout_rate: inverted dropout on the normalised weights, in [0, 1).
    dropout_rng: PRNG key for dropout. Without it (or with rate 0 or
      ``deterministic=True``) no dropout is applied.
    deterministic: None: dropout iff a key is given. False with a rate > 0
      and no key is an error.
    implementation: None (auto: ``'cudnn'`` where it can take the call, on
      an NVIDIA GPU; else ``'flash'``), ``'flash'`` (blockwise, O(T + S)
      memory, custom VJP), ``'reference'`` (the plain single-head function
      vmapped over heads), ``'xla'`` or ``'cudnn'`` (``jax.nn``). A kernel
      that cannot take the call raises a ValueError that says why.
    block_sizes: flash's (query, key) block sizes; default by backend
      (512 x 256 on CPU), shrunk to short sequences.
    return_residual: also return the rows' log-sum-exp of the logits, as
      ``jax.nn.dot_product_attention`` does (the sink's logit included).
    sinks: float ``[H]``, one learnable logit per query head (attention
      sinks, as in gpt-oss): each row's softmax denominator also holds
      ``exp(sinks[h])``, a key with a zero value, so a row may give weight
      to nothing. Differentiable. Rows with nothing visible stay zero; a
      ``+inf`` sink takes every weight (zeros, zero gradients).
    mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True: may attend),
      written for one element as in PyTorch's FlexAttention and ANDed with
      every other mask: ``b`` the flat batch row, ``h`` the query head,
      ``q_idx``/``kv_idx`` global positions (offsets included), all int32
      scalars. It may close over arrays. Without a ``block_mask`` every block
      it could touch is tested element by element (nothing is skipped for it).
    score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``: changes
      each float32 logit after scale, soft-cap and bias, before the masks.
      Gradients flow to the float arrays it closes over. A function is
      static under jit (define it once); a ``jax.tree_util.Partial`` carries
      its arrays as operands.
    block_mask: a ``jattn.BlockMask`` from ``jattn.create_block_mask``: its
      ``mask_mod``, and the blocks flash may skip or run without the test.
      Its block sizes are the call's unless ``block_sizes`` is given (then
      its states are converted, ``BlockMask.to_block_sizes``). Its states
      hold at positions ``0..T-1`` and ``0..S-1``: with ``q_offsets`` or
      ``kv_offsets`` the mod is tested element by element instead (the same
      mask, nothing skipped). A ``mask_mod`` beside it must be its own.

  Returns:
    ``[B..., T, H, V]`` in the query's dtype. A query row with nothing to
    attend to is zero, with finite gradients. With ``return_residual``, a
    pair ``(out, lse)``: ``lse [B..., T, H]`` in the query's dtype, without
    gradient (``-inf`` for rows with nothing to attend to).
  """
  call, opts, statics = _call.split_call(locals())
  return _attention_jit(call, opts, statics)


def attention_and_lse(query, key, value, **options):
  """``dot_product_attention(query, key, value, return_residual=True,
  **options)`` with the log-sum-exp in float32 whatever the dtype, and
  differentiable: for callers that merge partial results over chunks of
  keys (paged caches), whose gradients flow through the merge's weights.
  Only kernels whose log-sum-exp has a gradient take it (flash, reference,
  decode)."""
  arguments = dict(options, query=query, key=key, value=value, return_residual=True)
  call, opts, statics = _call.split_call(arguments, strict=True)
  return _attention_jit(call, opts, statics, lse_gradient=True)


def attention_of_stored(query, key, value, **options):
  """``dot_product_attention(query, key, value, **options)`` for keys and
  values a cache stores head-major, ``key [B..., K, S, D]``, ``value
  [B..., K, S, V]``: the kernels read them where they lie (the decode
  kernel as a batched matrix product per KV head). With
  ``return_residual``, the log-sum-exp is ``attention_and_lse``'s (float32,
  differentiable: for merging partial results over pages)."""
  arguments = dict(options, query=query, key=key, value=value)
  call, opts, statics = _call.split_call(arguments, strict=True)
  lse_gradient = opts.return_residual
  return _attention_jit(call, opts, statics, lse_gradient, kv_heads_first=True)


@functools.partial(
  jax.jit, static_argnames=('opts', 'statics', 'lse_gradient', 'kv_heads_first')
)
def _attention_jit(call, opts, statics, lse_gradient=False, kv_heads_first=False):
  if kv_heads_first:  # stored [B..., K, S, X], seen as [B..., S, K, X] (a view)
    swap = lambda x: jnp.swapaxes(x, -3, -2)
    call = call._replace(key=swap(call.key), value=swap(call.value))
  p = _prepare.prepare_call(call, opts, statics, kv_heads_first)
  kernel_for = functools.partial(_registry.select, lse_gradient=lse_gradient)
  return run(p, kernel_for, lse_gradient)


def run(p: Prepared, kernel_for, lse_gradient: bool = False):
  """The public result of the prepared call ``p`` with the kernel
  ``kernel_for(p)``: ``[B..., T, H, V]``, and the log-sum-exp ``[B..., T, H]``
  with ``return_residual`` (in the query's dtype without a gradient, or with
  ``lse_gradient`` float32 with its gradient). B, T or S of zero need no
  kernel: rows see no key."""
  q_len, heads = p.q.shape[1:3]
  shape = p.batch_shape + (q_len, heads, p.v.shape[-1])
  if p.empty:
    out = jnp.zeros(shape, p.q.dtype)
    lse = jnp.full(shape[:-1], -jnp.inf)
  else:
    out, lse = kernel_for(p)(p)  # lse None: a kernel that takes no return_residual
    out = out.reshape(shape)
    lse = None if lse is None else lse.reshape(shape[:-1])
  if not p.opts.return_residual:
    return out
  if lse_gradient:
    return out, lse.astype(jnp.float32)
  return out, jax.lax.stop_gradient(lse).astype(p.q.dtype)


def attention_weights(query, key, bias=None, mask=None, **options):
  """The normalised weights ``[B..., H, T, S]`` (float32) for the same arguments.

  ``options`` are ``dot_product_attention``'s keywords (``is_causal``,
  lengths, segment ids, window, chunk, prefix, scale, soft-cap, dropout,
  mask_mod, score_mod, block_mask, sinks: with sinks a row's weights sum to
  less than one);
  ``dot_product_attention(...) == einsum(weights, value)`` up to rounding,
  and rows with nothing to attend to are zero. Materialises ``[T, S]``: use
  it to inspect and plot, not inside a model.
  """
  arguments = dict(options, query=query, key=key, bias=bias, mask=mask)
  call, opts, statics = _call.split_call(arguments, strict=True)
  return _weights_jit(call, opts, statics)


@functools.partial(jax.jit, static_argnames=('opts', 'statics'))
def _weights_jit(call, opts, statics):
  p = _prepare.prepare_call(call, opts, statics)
  if p.empty:
    return jnp.zeros(p.batch_shape + (p.q.shape[2], p.q.shape[1], p.k.shape[1]))
  weights = _reference.weights(p)  # [B, H, T, S]
  return weights.reshape(p.batch_shape + weights.shape[1:])
