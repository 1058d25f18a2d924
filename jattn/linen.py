"""``jattn.linen.MultiHeadAttention``: a flax.linen wrapper.

Declares the parameters with ``self.param`` (same names and shapes as
``flax.linen.MultiHeadDotProductAttention``) and calls
``jattn.multihead.multi_head_attention``; it owns no math.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jattn import _options, _params, _wrappers, cache, multihead


class MultiHeadAttention(nn.Module):
  """Multi-head attention; E and E_kv are read from the inputs.

  Attributes: num_heads (H) and the rest of
  ``jattn.multihead.Hyperparameters`` (head_dim D, num_kv_heads K,
  value_head_dim V, out_features F, use_bias, use_sinks (a learnable
  ``'sinks'`` parameter [H]), param_dtype, initialisers);
  dtype (compute; default widest of inputs and parameters), dropout_rate,
  deterministic, implementation. Dropout draws from the ``'dropout'`` rng
  collection. ``decode=True``: as ``flax.linen.MultiHeadDotProductAttention``,
  ``init`` with inputs of the cache's shape ``(B, max_length, E)`` creates the
  ``'cache'`` collection, then each ``apply(..., mutable=['cache'])`` is a
  cached self-attention step of T >= 1 tokens (``jattn.cache``).
  """

  num_heads: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  value_head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  use_sinks: bool = False
  param_dtype: Any = jnp.float32
  kernel_init: Any = multihead.LECUN_NORMAL
  out_kernel_init: Any = None
  bias_init: Any = jax.nn.initializers.zeros
  dtype: Any = None
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  implementation: str | None = None
  decode: bool = False

  def __post_init__(self):
    # Settings are checked when the module is built, not at its first call.
    _wrappers.check_settings(
      self.dropout_rate, self.deterministic, self.implementation, allow_none=True
    )
    _options.as_int(self.num_heads, 'num_heads', minimum=1)
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    deterministic: bool | None = None,
    dropout_rng=None,
    **attention_kwargs,
  ):
    """``[B..., T, E] -> [B..., T, F]``; keyword options (``mask``, ``bias``,
    ``is_causal``, ...) as in ``dot_product_attention``."""
    kv_inputs = inputs_q if inputs_k is None else inputs_k
    shape = multihead.Hyperparameters(
      in_features=inputs_q.shape[-1],
      kv_features=kv_inputs.shape[-1],
      **{name: getattr(self, name) for name in HYPERPARAMETERS},
    )
    names = _params.PROJECTIONS + (('sinks',) if self.use_sinks else ())
    params = {
      name: self.param(name, functools.partial(shape.init_projection, name))
      for name in names
    }
    deterministic = (
      nn.merge_param('deterministic', self.deterministic, deterministic)
      if self.dropout_rate > 0.0
      else True
    )
    if not deterministic and dropout_rng is None:
      dropout_rng = self.make_rng('dropout')
    settings = _wrappers.settings(self, dropout_rng, deterministic)
    if self.decode:
      return self._step(
        params, inputs_q, inputs_k, inputs_v, settings, attention_kwargs
      )
    return multihead.multi_head_attention(
      params,
      inputs_q,
      inputs_k,
      inputs_v,
      **settings,
      **attention_kwargs,
    )

  def _step(self, params, inputs_q, inputs_k, inputs_v, settings, attention_kwargs):
    """Decode: the 'cache' collection is a ``jattn.cache.KVCache``, made at
    ``init`` for the inputs' shape (which then run as plain attention)."""
    if inputs_k is not None or inputs_v is not None:
      raise ValueError('decode is self-attention: pass only `inputs_q`.')
    initialized = self.has_variable('cache', 'cached_key')
    dtype = _params.compute_dtype(self.dtype, inputs_q, *jax.tree.leaves(params))
    empty = functools.cache(  # built once, at init
      lambda: cache.init_cache(params, inputs_q.shape[0], inputs_q.shape[1], dtype)
    )
    cached_key = self.variable('cache', 'cached_key', lambda: empty().key)
    cached_value = self.variable('cache', 'cached_value', lambda: empty().value)
    lengths = self.variable('cache', 'cache_lengths', lambda: empty().lengths)
    if not initialized:
      return multihead.multi_head_attention(
        params, inputs_q, **settings, is_causal=True, **attention_kwargs
      )
    state = cache.KVCache(cached_key.value, cached_value.value, lengths.value)
    out, state = cache.multi_head_attention_step(
      params, inputs_q, state, **settings, **attention_kwargs
    )
    cached_key.value, cached_value.value = state.key, state.value
    lengths.value = state.lengths
    return out


# The module's attributes that are hyper-parameters: all of them but the
# features, which the inputs give (a test checks the two stay in step).
HYPERPARAMETERS = tuple(
  f.name
  for f in dataclasses.fields(multihead.Hyperparameters)
  if f.name not in ('in_features', 'kv_features')
)
