"""Use ``jattn.dot_product_attention`` inside Flax's own attention modules.

``flax.nnx.MultiHeadAttention(..., attention_fn=jattn.flax_attention_fn())``
and ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` then run
jattn's kernels (and its zero output for fully masked rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.attention import attention_weights, dot_product_attention


def _matmul_precision(precision) -> str | None:
  """Flax's ``precision`` (a ``lax.Precision``, its name, or a pair of them)
  as a ``jax.default_matmul_precision`` name; None keeps the default."""
  if precision is None:
    return None
  pair = precision if isinstance(precision, (tuple, list)) else (precision,)
  try:
    levels = [jax.lax.Precision(p) for p in pair]
  except (TypeError, ValueError):
    raise TypeError(
      '`precision` must be None, a jax.lax.Precision, its name or a pair of '
      f'them; got {precision!r}.'
    ) from None
  return max(levels, key=lambda p: p.value).name.lower()


def flax_attention_fn(implementation: str | None = None, **options):
  """An ``attention_fn`` with Flax's signature that calls jattn.

  ``options`` are fixed ``jattn.dot_product_attention`` keywords (for example
  ``logits_soft_cap``). What Flax passes means what it means in Flax:

  - masks: boolean, or the float 0/1 masks of ``make_causal_mask``,
    ``combine_masks`` and the decode cache (non-zero = may attend);
  - ``dtype``: queries, keys and values are cast to it, and the output has
    it; the logits and softmax stay float32 inside jattn;
  - weights sown for ``sow_weights=True`` are the softmax before dropout, in
    ``dtype`` as Flax sows them (float32 with linen's
    ``force_fp32_for_softmax=True``, whose output is then float32 too);
  - ``is_causal`` in Flax's decode step (one query, more keys, and the
    cache's mask) is aligned bottom-right: the query is the newest position
    (flax#5591). Every other call keeps top-left causal, as Flax defines it
    (a cross-attention with T < S included);
  - ``precision`` sets the matmul precision of the call
    (``jax.default_matmul_precision``);
  - ``broadcast_dropout`` is ignored: jattn draws its dropout mask per batch
    element and head;
  - a custom ``einsum_dot_general``, ``qk_attn_weights_einsum`` or
    ``attn_weights_value_einsum`` is a ``TypeError``: jattn's kernels are
    not einsums. Keep Flax's default ``attention_fn`` for those.
  """

  def attention_fn(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout=True,
    dropout_rng=None,
    dropout_rate=0.0,
    deterministic=False,
    dtype=None,
    precision=None,
    module=None,
    is_causal=False,
    force_fp32_for_softmax=False,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
  ):
    del broadcast_dropout
    custom = {
      'einsum_dot_general': einsum_dot_general,
      'qk_attn_weights_einsum': qk_attn_weights_einsum,
      'attn_weights_value_einsum': attn_weights_value_einsum,
    }
    given = [name for name, fn in custom.items() if fn is not None]
    if given:
      raise TypeError(
        f'flax_attention_fn does not take a custom einsum ({", ".join(given)}): '
        "jattn's kernels are not einsums. Use Flax's default attention_fn for a "
        'custom einsum, or `precision` for the matmul precision.'
      )
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    dtype = query.dtype
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
      mask = jnp.asarray(mask) != 0
    kwargs = dict(is_causal=is_causal, **options)
    q_len, kv_len = query.shape[-3], key.shape[-3]
    if is_causal and q_len == 1 < kv_len and mask is not None:
      # Flax's decode step: one query, the newest position of its cache,
      # and the cache's mask (the positions written so far). Causal is then
      # aligned bottom-right (top-left, the query would see key 0 only:
      # flax#5591). Every other call keeps top-left causal, as Flax, jax.nn
      # and PyTorch define it for cross-attention (T < S).
      batch_shape = query.shape[:-3]
      kwargs['q_offsets'] = jnp.full(batch_shape, kv_len - 1, jnp.int32)
    fp32_softmax = force_fp32_for_softmax and dtype != jnp.float32
    with jax.default_matmul_precision(_matmul_precision(precision)):
      if module is not None:  # Flax asked to sow the weights (before dropout)
        weights = attention_weights(query, key, bias, mask, **kwargs)
        weights = weights if fp32_softmax else weights.astype(dtype)
        if isinstance(module, nnx.Module):
          module.sow(nnx.Intermediate, 'attention_weights', weights)
        else:
          module.sow('intermediates', 'attention_weights', weights)
      out = dot_product_attention(
        query,
        key,
        value,
        bias,
        mask,
        implementation=implementation,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        deterministic=deterministic,
        **kwargs,
      )
    return out.astype(jnp.float32) if fp32_softmax else out

  return attention_fn
