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

from jattn import _checks
from jattn._options import as_bool, as_int
from jattn.attention import attention_weights, dot_product_attention

Initializer = Callable[..., jnp.ndarray]
LECUN_NORMAL = jax.nn.initializers.lecun_normal()  # Flax's default kernel init
PROJECTIONS = ('query', 'key', 'value', 'out')


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
    _check_params(params)
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


_LAYOUTS = {
  ('query', 'kernel'): '[E, H, D]',
  ('key', 'kernel'): '[E, K, D]',
  ('value', 'kernel'): '[E, K, V]',
  ('out', 'kernel'): '[H, V, F]',
  ('query', 'bias'): '[H, D]',
  ('key', 'bias'): '[K, D]',
  ('value', 'bias'): '[K, V]',
  ('out', 'bias'): '[F]',
}


def _check_params(params) -> None:
  """The pytree has the four projections with consistent shapes (and
  optional sinks)."""
  keys = set(params) - {'sinks'} if isinstance(params, dict) else None
  if keys != set(PROJECTIONS):
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(
      f'`params` must be a dict with keys {list(PROJECTIONS)} (and optional '
      f"'sinks'); got {got}."
    )
  for name in PROJECTIONS:
    entry = params[name]
    if not isinstance(entry, dict) or 'kernel' not in entry:
      raise ValueError(f"`params['{name}']` must be a dict with a 'kernel'.")
    for leaf, array in entry.items():
      if leaf not in ('kernel', 'bias'):
        raise ValueError(
          f"`params['{name}']` holds {leaf!r}; only 'kernel' and 'bias' belong there."
        )
      if array is None:
        raise TypeError(
          f"`params['{name}']['{leaf}']` is None; leave the key out for no bias."
        )
      _checks.check_array(
        array, f"params['{name}']['{leaf}']", min_rank=1, layout=_LAYOUTS[name, leaf]
      )
      _checks.check_floating(array, f"params['{name}']['{leaf}']")
    if entry['kernel'].ndim != 3:
      raise ValueError(
        f"`params['{name}']['kernel']` must have rank 3; got shape "
        f'{tuple(entry["kernel"].shape)}.'
      )
  heads, head_dim = params['query']['kernel'].shape[1:]
  if 'sinks' in params:
    _checks.check_array(params['sinks'], "params['sinks']", min_rank=1, layout='[H]')
    _checks.check_floating(params['sinks'], "params['sinks']")
    _checks.check_shape(params['sinks'], "params['sinks']", (heads,), '[H]')
  kv_heads = params['key']['kernel'].shape[1]
  if heads % kv_heads:
    raise ValueError(
      f"`params['key']['kernel']` [E, K, D] has K={kv_heads} heads, which "
      f'does not divide the H={heads} query heads; got shape '
      f'{tuple(params["key"]["kernel"].shape)}.'
    )
  expected = {
    'key': (None, kv_heads, head_dim),
    'value': (params['key']['kernel'].shape[0], kv_heads, None),
    'out': (heads, params['value']['kernel'].shape[2], None),
  }
  for name, dims in expected.items():
    actual = params[name]['kernel'].shape
    if any(e is not None and e != a for e, a in zip(dims, actual, strict=True)):
      raise ValueError(
        f"`params['{name}']['kernel']` must be {_LAYOUTS[name, 'kernel']} = "
        f'{tuple("?" if d is None else d for d in dims)} given the query '
        f'kernel {tuple(params["query"]["kernel"].shape)}; got '
        f'{tuple(actual)}.'
      )
  for name in PROJECTIONS:
    kernel = params[name]['kernel']
    bias = params[name].get('bias')
    want = kernel.shape[-1:] if name == 'out' else kernel.shape[1:]
    if bias is not None and tuple(bias.shape) != tuple(want):
      raise ValueError(
        f"`params['{name}']['bias']` must have shape {tuple(want)}; got "
        f'{tuple(bias.shape)}.'
      )


def wrapper_settings(module, dropout_rng, deterministic) -> dict:
  """What a Flax wrapper passes to ``multi_head_attention`` besides its
  inputs: its compute dtype, dropout and implementation."""
  return dict(
    dtype=module.dtype,
    dropout_rate=module.dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
    implementation=module.implementation,
  )


def _compute_dtype(dtype, *arrays):
  """The given dtype, or the widest float among the arrays (Flax's rule)."""
  if dtype is not None:
    return _checks.check_float_dtype(dtype, 'dtype')
  dtypes = {jnp.dtype(x.dtype) for x in arrays}
  widest = max(dtypes, key=lambda d: d.itemsize)
  if widest.itemsize == 2 and len(dtypes) > 1:  # bfloat16 with float16
    return jnp.dtype(jnp.float32)
  return widest


def _project(x, projection, subscripts: str, dtype):
  y = jnp.einsum(subscripts, x.astype(dtype), projection['kernel'].astype(dtype))
  if 'bias' in projection:
    bias = projection['bias'].astype(dtype)
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def _projections(params, inputs_q, inputs_k, inputs_v, dtype):
  """``(query [B..., T, H, D], key [B..., S, K, D], value [B..., S, K, V],
  compute dtype)`` after checking the inputs against the parameters."""
  _check_params(params)
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError('`inputs_v` was given without `inputs_k`.')
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  for name, x in (
    ('inputs_q', inputs_q),
    ('inputs_k', inputs_k),
    ('inputs_v', inputs_v),
  ):
    _checks.check_array(x, name, min_rank=2, layout='[B..., T|S, E]')
    _checks.check_floating(x, name)
  _checks.check_dim(
    inputs_q,
    'inputs_q',
    -1,
    params['query']['kernel'].shape[0],
    '[B..., T, E]',
    "E (rows of params['query']['kernel'])",
  )
  for name, x in (('inputs_k', inputs_k), ('inputs_v', inputs_v)):
    kernel = params['key' if name == 'inputs_k' else 'value']['kernel']
    _checks.check_dim(
      x, name, -1, kernel.shape[0], '[B..., S, E_kv]', 'E_kv (rows of its kernel)'
    )
  dtype = _compute_dtype(dtype, inputs_q, inputs_k, inputs_v, *jax.tree.leaves(params))
  query = _project(inputs_q, params['query'], '...te,ehd->...thd', dtype)
  key = _project(inputs_k, params['key'], '...se,ekd->...skd', dtype)
  value = _project(inputs_v, params['value'], '...se,ekv->...skv', dtype)
  return query, key, value, dtype


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
  query, key, value, dtype = _projections(params, inputs_q, inputs_k, inputs_v, dtype)
  encoded = dot_product_attention(
    query,
    key,
    value,
    bias,
    mask,
    sinks=_sinks(params, attention_kwargs),
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
    implementation=implementation,
    **attention_kwargs,
  )
  return _project(encoded, params['out'], '...thv,hvf->...tf', dtype)


def multi_head_attention_weights(
  params, inputs_q, inputs_k=None, *, mask=None, bias=None, dtype=None, **options
):
  """The normalised weights ``[B..., H, T, S]`` (float32) of
  ``multi_head_attention`` with the same arguments, to inspect and plot.

  ``options`` are ``jattn.attention_weights``'s (``is_causal``, lengths,
  segment ids, window, ...). Materialises ``[T, S]`` per head.
  """
  query, key, _, _ = _projections(params, inputs_q, inputs_k, None, dtype)
  sinks = _sinks(params, options)
  return attention_weights(query, key, bias, mask, sinks=sinks, **options)


def _sinks(params, options):
  """``params['sinks']`` (or None); sinks come from the pytree only."""
  if 'sinks' in options:
    raise TypeError(
      "`sinks` of the multi-head functions are the parameter params['sinks'] "
      '(init with use_sinks=True), not an option.'
    )
  return params.get('sinks')
