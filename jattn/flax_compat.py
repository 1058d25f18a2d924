"""Use ``jattn.dot_product_attention`` inside Flax's own attention modules.

``flax.nnx.MultiHeadAttention(..., attention_fn=jattn.flax_attention_fn())``
and ``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` then run
jattn's kernels (and its zero output for fully masked rows).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jattn.attention import attention_weights, dot_product_attention


def flax_attention_fn(implementation: str | None = None, **options):
  """An ``attention_fn`` with Flax's signature that calls jattn.

  ``options`` are fixed ``jattn.dot_product_attention`` keywords (for example
  ``logits_soft_cap``). Masks are taken as Flax takes them: boolean, or the
  float 0/1 masks of ``make_causal_mask``, ``combine_masks`` and the decode
  cache (non-zero = may attend). Weights sown for ``sow_weights=True`` are
  the softmax before dropout, as Flax sows them. Flax's ``precision`` and
  ``broadcast_dropout`` are accepted and ignored: jattn's logits are float32
  and its dropout mask is drawn per batch element and head.
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
  ):
    del broadcast_dropout, precision
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    if mask is not None and jnp.asarray(mask).dtype != jnp.bool_:
      mask = jnp.asarray(mask) != 0
    kwargs = dict(is_causal=is_causal, **options)
    if module is not None:  # Flax asked to sow the weights (before dropout)
      weights = attention_weights(query, key, bias, mask, **kwargs)
      if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, 'attention_weights', weights)
      else:
        module.sow('intermediates', 'attention_weights', weights)
    return dot_product_attention(
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

  return attention_fn
