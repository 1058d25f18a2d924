"""The multi-head parameter pytree: its layout, its checks and the projections.

Said once for every layer that holds or applies the parameters (the
multi-head functions, the cached step and both Flax wrappers)::

  {'query': {'kernel': [E, H, D], 'bias': [H, D]},
   'key':   {'kernel': [E_kv, K, D], 'bias': [K, D]},
   'value': {'kernel': [E_kv, K, V], 'bias': [K, V]},
   'out':   {'kernel': [H, V, F], 'bias': [F]},
   'sinks': [H]}                      # optional
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import _checks

PROJECTIONS = ('query', 'key', 'value', 'out')

LAYOUTS = {
  ('query', 'kernel'): '[E, H, D]',
  ('key', 'kernel'): '[E, K, D]',
  ('value', 'kernel'): '[E, K, V]',
  ('out', 'kernel'): '[H, V, F]',
  ('query', 'bias'): '[H, D]',
  ('key', 'bias'): '[K, D]',
  ('value', 'bias'): '[K, V]',
  ('out', 'bias'): '[F]',
}


def check_params(params) -> None:
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
        array, f"params['{name}']['{leaf}']", min_rank=1, layout=LAYOUTS[name, leaf]
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
        f"`params['{name}']['kernel']` must be {LAYOUTS[name, 'kernel']} = "
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


def compute_dtype(dtype, *arrays):
  """The given dtype, or the widest float among the arrays (Flax's rule)."""
  if dtype is not None:
    return _checks.check_float_dtype(dtype, 'dtype')
  dtypes = {jnp.dtype(x.dtype) for x in arrays}
  widest = max(dtypes, key=lambda d: d.itemsize)
  if widest.itemsize == 2 and len(dtypes) > 1:  # bfloat16 with float16
    return jnp.dtype(jnp.float32)
  return widest


def project(x, projection, subscripts: str, dtype):
  y = jnp.einsum(subscripts, x.astype(dtype), projection['kernel'].astype(dtype))
  if 'bias' in projection:
    bias = projection['bias'].astype(dtype)
    y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  return y


def projections(params, inputs_q, inputs_k, inputs_v, dtype):
  """``(query [B..., T, H, D], key [B..., S, K, D], value [B..., S, K, V],
  compute dtype)`` after checking the inputs against the parameters."""
  check_params(params)
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
  dtype = compute_dtype(dtype, inputs_q, inputs_k, inputs_v, *jax.tree.leaves(params))
  query = project(inputs_q, params['query'], '...te,ehd->...thd', dtype)
  key = project(inputs_k, params['key'], '...se,ekd->...skd', dtype)
  value = project(inputs_v, params['value'], '...se,ekv->...skv', dtype)
  return query, key, value, dtype


def sinks(params, options):
  """``params['sinks']`` (or None); sinks come from the pytree only."""
  if 'sinks' in options:
    raise TypeError(
      "`sinks` of the multi-head functions are the parameter params['sinks'] "
      '(init with use_sinks=True), not an option.'
    )
  return params.get('sinks')
