"""Multi-head attention as pure functions over an explicit parameter pytree.

The pytree is a plain nested dict in the layout of
``flax.linen.MultiHeadDotProductAttention`` (and ``flax.nnx.MultiHeadAttention``)::

  {'query': {'kernel': [E, H, D], 'bias': [H, D]},
   'key':   {'kernel': [E, K, D], 'bias': [K, D]},
   'value': {'kernel': [E, K, V], 'bias': [K, V]},
   'out':   {'kernel': [H, V, F], 'bias': [F]}}

Biases are absent when ``use_bias=False``. With ``use_sinks=True`` the
pytree also holds ``'sinks': [H]``, one learnable attention-sink logit per
query head (see ``jattn.dot_product_attention``): jattn's extension of the
layout, which Flax's modules lack (drop the key to load the rest into them).
Head counts and dims are read from the shapes, so ``multi_head_attention``
needs no config object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn import _checks, _params
from jattn._options import as_bool, as_int
from jattn._params import PROJECTIONS
from jattn.attention import attention_weights, dot_product_attention

Initializer = Callable[..., jnp.ndarray]
LECUN_NORMAL = jax.nn.initializers.lecun_normal()  # Flax's default kernel init


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """What fixes the parameter pytree, declared once: ``param_shapes``,
  ``init_params``, ``jattn.nnx`` and ``jattn.linen`` all take these.

  Defaults follow Flax: D = E // H, K = H, V = D, F = E, E_kv = E.
  """

  in_features: int  # E
  num_heads: int  # H
  head_dim: int | None = None  # D
  num_kv_heads: int | None = None  # K (< H is GQA, 1 is MQA)
  value_head_dim: int | None = None  # V
  out_features: int | None = None  # F
  kv_features: int | None = None  # E_kv, of the key/value inputs
  use_bias: bool = True
  use_sinks: bool = False  # a learnable sink logit per query head, 'sinks' [H]
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = LECUN_NORMAL
  out_kernel_init: Initializer | None = None  # default kernel_init
  bias_init: Initializer = jax.nn.initializers.zeros

  def __post_init__(self):
    for name in ('in_features', 'num_heads'):
      as_int(getattr(self, name), name, minimum=1)
    for name in ('head_dim', 'num_kv_heads', 'value_head_dim', 'out_features'):
      if getattr(self, name) is not None:
        as_int(getattr(self, name), name, minimum=1)
    if self.kv_features is not None:
      as_int(self.kv_features, 'kv_features', minimum=1)
    as_bool(self.use_bias, 'use_bias')
    as_bool(self.use_sinks, 'use_sinks')
    _checks.check_float_dtype(self.param_dtype, 'param_dtype')
    if self.head_dim is None and self.in_features % self.num_heads:
      raise ValueError(
        f'`in_features`={self.in_features} is not divisible by `num_heads`='
        f'{self.num_heads}; pass `head_dim`.'
      )
    if self.num_heads % (self.num_kv_heads or self.num_heads):
      raise ValueError(
        f'`num_heads`={self.num_heads} must be a multiple of `num_kv_heads`='
        f'{self.num_kv_heads}.'
      )

  @classmethod
  def of_params(cls, params, **initializers) -> Hyperparameters:
    """The hyper-parameters of an existing pytree (read from its shapes)."""
    _params.check_params(params)
    in_features, heads, head_dim = params['query']['kernel'].shape
    kv_features, kv_heads, value_dim = params['value']['kernel'].shape
    return cls(
      in_features,
      heads,
      head_dim=head_dim,
      num_kv_heads=kv_heads,
      value_head_dim=value_dim,
      out_features=params['out']['kernel'].shape[-1],
      kv_features=kv_features,
      use_bias='bias' in params['query'],
      use_sinks='sinks' in params,
      **initializers,
    )

  def shapes(self) -> dict:
    """The shape of every parameter (layout in the module docstring)."""
    e, h = self.in_features, self.num_heads
    d = self.head_dim or e // h
    k, v = self.num_kv_heads or h, self.value_head_dim or d
    e_kv = self.kv_features or e
    kernels = {
      'query': (e, h, d),
      'key': (e_kv, k, d),
      'value': (e_kv, k, v),
      'out': (h, v, self.out_features or e),
    }
    shapes = {}
    for name, kernel in kernels.items():
      shapes[name] = {'kernel': kernel}
      if self.use_bias:
        shapes[name]['bias'] = kernel[-1:] if name == 'out' else kernel[1:]
    if self.use_sinks:
      shapes['sinks'] = (h,)
    return shapes

  def init_projection(self, name: str, rng):
    """One projection's ``{'kernel', 'bias'}``; the fan-in is E (or H*V for
    the out projection). ``'sinks'``: zeros ``[H]``."""
    if name == 'sinks':  # zeros: each sink starts as one more zero logit
      return jnp.zeros(self.shapes()['sinks'], self.param_dtype)
    shapes = self.shapes()[name]
    kernel_rng, bias_rng = jax.random.split(rng)
    kernel_shape = shapes['kernel']
    fan_in_axes = 2 if name == 'out' else 1
    flat = (
      math.prod(kernel_shape[:fan_in_axes]),
      math.prod(kernel_shape[fan_in_axes:]),
    )
    init = self.kernel_init
    if name == 'out' and self.out_kernel_init is not None:
      init = self.out_kernel_init
    params = {'kernel': init(kernel_rng, flat, self.param_dtype).reshape(kernel_shape)}
    if 'bias' in shapes:
      params['bias'] = self.bias_init(bias_rng, shapes['bias'], self.param_dtype)
    return params

  def init(self, rng) -> dict[str, dict[str, jnp.ndarray]]:
    """A fresh parameter pytree."""
    _checks.check_prng_key(rng, 'rng')
    rngs = jax.random.split(rng, len(PROJECTIONS))
    params = {
      name: self.init_projection(name, r)
      for name, r in zip(PROJECTIONS, rngs, strict=True)
    }
    if self.use_sinks:
      params['sinks'] = self.init_projection('sinks', rng)
    return params


def param_shapes(in_features: int, num_heads: int, **hyperparameters) -> dict:
  """The shape of every parameter; keywords as in ``Hyperparameters``."""
  return Hyperparameters(in_features, num_heads, **hyperparameters).shapes()


def init_params(
  rng, in_features: int, num_heads: int, **hyperparameters
) -> dict[str, dict[str, jnp.ndarray]]:
  """A fresh parameter pytree (layout in the module docstring); keywords as
  in ``Hyperparameters`` (head_dim, num_kv_heads, value_head_dim,
  out_features, kv_features, use_bias, use_sinks, param_dtype, kernel_init,
  out_kernel_init, bias_init)."""
  return Hyperparameters(in_features, num_heads, **hyperparameters).init(rng)


def multi_head_attention(
  params,
  inputs_q,
  inputs_k=None,
  inputs_v=None,
  *,
  mask=None,
  bias=None,
  dtype=None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool | None = None,
  implementation: str | None = None,
  **attention_kwargs,
):
  """Project, attend, project back: ``[B..., T, E] -> [B..., T, F]``.

  Args:
    params: the parameter pytree (module docstring).
    inputs_q: ``[B..., T, E]``.
    inputs_k: ``[B..., S, E_kv]``; None for self-attention.
    inputs_v: ``[B..., S, E_kv]``; None means ``inputs_k``.
    mask, bias: as in ``jattn.dot_product_attention`` (``[B..., H, T, S]``).
    dtype: compute dtype; default the widest of the inputs and parameters.
    dropout_rate, dropout_rng, deterministic, implementation: as in
      ``jattn.dot_product_attention``.
    **attention_kwargs: any other ``jattn.dot_product_attention`` option
      (``is_causal``, ``query_seq_lengths``, ``q_segment_ids``, ...).

  Returns:
    ``[B..., T, F]`` in the compute dtype.
  """
  query, key, value, dtype = _params.projections(
    params, inputs_q, inputs_k, inputs_v, dtype
  )
  encoded = dot_product_attention(
    query,
    key,
    value,
    bias,
    mask,
    sinks=_params.sinks(params, attention_kwargs),
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
    implementation=implementation,
    **attention_kwargs,
  )
  return _params.project(encoded, params['out'], '...thv,hvf->...tf', dtype)


def multi_head_attention_weights(
  params, inputs_q, inputs_k=None, *, mask=None, bias=None, dtype=None, **options
):
  """The normalised weights ``[B..., H, T, S]`` (float32) of
  ``multi_head_attention`` with the same arguments, to inspect and plot.

  ``options`` are ``jattn.attention_weights``'s (``is_causal``, lengths,
  segment ids, window, ...). Materialises ``[T, S]`` per head.
  """
  query, key, _, _ = _params.projections(params, inputs_q, inputs_k, None, dtype)
  sinks = _params.sinks(params, options)
  return attention_weights(query, key, bias, mask, sinks=sinks, **options)
