"""``jattn.nnx.MultiHeadAttention``: a flax.nnx wrapper that holds parameters.

It owns no math: ``__call__`` gathers its parameters into the plain pytree and
calls ``jattn.multihead.multi_head_attention``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jattn import _options, _params, _wrappers, cache, multihead


class _Projection(nnx.Module):
  """One projection's parameters (``kernel`` and optional ``bias``)."""

  def __init__(self, arrays: dict[str, jnp.ndarray]):
    self.kernel = nnx.Param(arrays['kernel'])
    self.bias = nnx.Param(arrays['bias']) if 'bias' in arrays else None

  def as_dict(self) -> dict[str, jnp.ndarray]:
    arrays = {'kernel': self.kernel[...]}
    if self.bias is not None:
      arrays['bias'] = self.bias[...]
    return arrays


class MultiHeadAttention(nnx.Module):
  """Multi-head attention; parameters in Flax's layout (see ``jattn.multihead``).

  Args mirror ``flax.nnx.MultiHeadAttention`` where they overlap:
    num_heads: H. in_features: E.
    dtype: compute dtype (default: widest of inputs and parameters).
    dropout_rate, deterministic: dropout on the attention weights; draws keys
      from ``rngs.dropout`` unless ``rngs`` is passed to ``__call__``.
    implementation: as in ``jattn.dot_product_attention``.
    decode: calls are cached self-attention steps (``init_cache`` first):
      each call's T tokens are written to the cache after the ones before
      and attend causally to everything cached (``jattn.cache``): prefill
      with a long call, then one token per call.
    rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` if dropout is used).
    **hyperparameters: the rest of ``jattn.multihead.Hyperparameters``
      (head_dim D, num_kv_heads K, value_head_dim V, out_features F,
      kv_features, use_bias, use_sinks, param_dtype and the initialisers).
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    *,
    dtype=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    implementation: str | None = None,
    decode: bool = False,
    rngs: nnx.Rngs,
    **hyperparameters,
  ):
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(
        f'`rngs` must be an nnx.Rngs (e.g. nnx.Rngs(0)); got {type(rngs).__name__}.'
      )
    dropout_rate, deterministic, implementation = _wrappers.check_settings(
      dropout_rate, deterministic, implementation, allow_none=False
    )
    if dropout_rate > 0.0 and 'dropout' not in rngs and 'default' not in rngs:
      raise ValueError(
        f'dropout_rate={dropout_rate} needs a dropout stream: '
        'rngs=nnx.Rngs(params=..., dropout=...).'
      )
    shape = multihead.Hyperparameters(in_features, num_heads, **hyperparameters)
    self._set_params(shape.init(rngs.params()))
    self.dtype = dtype
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.implementation = implementation
    self.decode = _options.as_bool(decode, 'decode')
    self.rngs = rngs.dropout.fork() if dropout_rate > 0 else None
    self.cached_key = nnx.data(None)  # set by init_cache
    self.cached_value = nnx.data(None)
    self.cache_lengths = nnx.data(None)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """An empty cache for ``input_shape = (B, max_length, E)`` (as
    ``flax.nnx.MultiHeadAttention.init_cache``): keys and values of the K
    KV heads, ``dtype`` (the compute dtype of the calls)."""
    *batch, capacity, _ = input_shape
    if len(batch) != 1:
      raise ValueError(
        f'`input_shape` must be (B, max_length, E); got {tuple(input_shape)}.'
      )
    empty = cache.init_cache(self.to_params(), batch[0], capacity, dtype)
    self.cached_key = nnx.Cache(empty.key)
    self.cached_value = nnx.Cache(empty.value)
    self.cache_lengths = nnx.Cache(empty.lengths)

  def _set_params(self, params) -> None:
    _params.check_params(params)
    self.query = _Projection(params['query'])
    self.key = _Projection(params['key'])
    self.value = _Projection(params['value'])
    self.out = _Projection(params['out'])
    self.sinks = nnx.Param(params['sinks']) if 'sinks' in params else None

  @classmethod
  def from_params(
    cls,
    params,
    *,
    dtype=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    implementation: str | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> MultiHeadAttention:
    """A module holding ``params`` (e.g. from ``jattn.linen`` or Flax linen)."""
    shape = multihead.Hyperparameters.of_params(params)
    fields = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape)}
    module = cls(
      fields.pop('num_heads'),
      fields.pop('in_features'),
      rngs=rngs or nnx.Rngs(0),
      dtype=dtype,
      dropout_rate=dropout_rate,
      deterministic=deterministic,
      implementation=implementation,
      **fields,
    )
    module._set_params(params)  # replaces the fresh initialisation
    return module

  def to_params(self) -> dict:
    """The plain parameter pytree (Flax linen's layout, and 'sinks')."""
    params = {name: getattr(self, name).as_dict() for name in _params.PROJECTIONS}
    if self.sinks is not None:
      params['sinks'] = self.sinks[...]
    return params

  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | None = None,
    decode: bool | None = None,
    **attention_kwargs,
  ):
    """``[B..., T, E] -> [B..., T, F]``; keyword options (``mask``, ``bias``,
    ``is_causal``, lengths, segments, ...) as in ``dot_product_attention``.
    ``decode`` overrides the module's (a cached step: ``[B, T, E]``,
    self-attention; options as in ``jattn.cache.multi_head_attention_step``,
    ``num_new`` included)."""
    deterministic = self.deterministic if deterministic is None else deterministic
    dropout_rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      stream = rngs.dropout if rngs is not None else self.rngs
      if stream is None:
        raise ValueError(
          'dropout needs `rngs`: pass rngs= to __call__ or construct the '
          'module with an nnx.Rngs that has a dropout stream.'
        )
      dropout_rng = stream()
    settings = _wrappers.settings(self, dropout_rng, deterministic)
    if self.decode if decode is None else decode:
      return self._step(inputs_q, inputs_k, inputs_v, settings, attention_kwargs)
    return multihead.multi_head_attention(
      self.to_params(),
      inputs_q,
      inputs_k,
      inputs_v,
      **settings,
      **attention_kwargs,
    )

  def _step(self, inputs_q, inputs_k, inputs_v, settings, attention_kwargs):
    if inputs_k is not None or inputs_v is not None:
      raise ValueError('decode is self-attention: pass only `inputs_q`.')
    if self.cached_key is None:
      raise ValueError('decode needs a cache: call `init_cache` first.')
    state = cache.KVCache(
      self.cached_key[...], self.cached_value[...], self.cache_lengths[...]
    )
    out, state = cache.multi_head_attention_step(
      self.to_params(), inputs_q, state, **settings, **attention_kwargs
    )
    self.cached_key[...] = state.key
    self.cached_value[...] = state.value
    self.cache_lengths[...] = state.lengths
    return out
