"""Validate the public arguments and bring them to the kernels' layout.

Everything here runs at trace time: shapes and dtypes are static, so bad input
fails before anything is computed, with a message that names the argument.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jattn import _checks, _numerics, _registry
from jattn._mods import CallDims, Mod, join, same_function, split
from jattn._options import make_options
from jattn._types import Options, Prepared
from jattn._visibility import ARRAYS, STATIC_RULES, Visibility, sequence_arrays
from jattn.block_mask import BlockMask


class Mods(NamedTuple):
  """The user functions of a call (``jattn._mods``), inside its jit."""

  mask_mod: object = None
  score_mod: object = None
  block_mask: BlockMask | None = None


class Call(NamedTuple):
  """A public call's arrays, as it was given: the dynamic argument of its
  jit (a pytree; the user functions' arrays in ``mod_leaves``)."""

  query: jnp.ndarray
  key: jnp.ndarray
  value: jnp.ndarray | None = None
  bias: jnp.ndarray | None = None
  mask: jnp.ndarray | None = None
  arrays: dict | None = None  # by keyword: the set ones of sequence_arrays()
  dropout_rng: jnp.ndarray | None = None
  sinks: jnp.ndarray | None = None
  mod_leaves: tuple = ((), ())
  block_mask: BlockMask | None = None


_CALL_ARGUMENTS = ('query', 'key', 'value', 'bias', 'mask', 'sinks', 'block_mask')


def split_call(arguments: dict, *, strict: bool = False):
  """A public function's ``locals()`` (or, ``strict``, its arguments with
  ``**options``, where an unknown name is a TypeError) -> ``(Call, Options,
  statics)``: its arrays, its validated static options, and the static
  parts of its user functions (``prepare_call`` joins them again)."""
  arguments = dict(arguments)
  given = {name: arguments.pop(name, None) for name in _CALL_ARGUMENTS}
  mods = arguments.pop('mask_mod', None), arguments.pop('score_mod', None)
  block_mask = given['block_mask']
  if mods[0] is not None and isinstance(block_mask, BlockMask):
    # Checked here, on the caller's arrays: inside the jit every array is a
    # new tracer and two mods could only be told apart by their code.
    if not same_function(mods[0], block_mask.mask_mod):
      raise ValueError(
        '`mask_mod` and `block_mask` were both given with different mods (or '
        'one mod over different arrays); the block mask carries its own '
        'mask_mod: pass only `block_mask`.'
      )
    mods = None, mods[1]
  arrays, opts = split_arguments(arguments, strict=strict)
  parts = [split(mod) for mod in mods]
  statics, leaves = tuple(s for s, _ in parts), tuple(x for _, x in parts)
  call = Call(
    **{name: given[name] for name in _CALL_ARGUMENTS},
    arrays=arrays,
    dropout_rng=arguments.get('dropout_rng'),
    mod_leaves=leaves,
  )
  return call, opts, statics


def prepare_arguments(**arguments) -> Prepared:
  """``prepare`` of a public call's keyword arguments, outside any jit (for
  tests and tools that inspect a prepared call)."""
  return prepare_call(*split_call(arguments, strict=True))


def prepare_call(call: Call, opts: Options, statics) -> Prepared:
  """``prepare`` of a ``split_call``'s parts, inside the jit."""
  mask_mod, score_mod = map(join, statics, call.mod_leaves)
  mods = Mods(mask_mod, score_mod, call.block_mask)
  return prepare(
    call.query, call.key, call.value, call.bias, call.mask, call.arrays,
    call.dropout_rng, opts, call.sinks, mods,
  )  # fmt: skip


def split_arguments(arguments: dict, *, strict: bool = False) -> tuple[dict, Options]:
  """A public function's ``locals()`` (or, ``strict``, its ``**options``,
  where an unknown name is a TypeError) -> (its per-sequence arrays, its
  validated static options). Names a function lacks count as unset."""
  names = inspect.signature(make_options).parameters
  if strict:
    unknown = sorted(set(arguments) - set(names) - set(sequence_arrays()))
    if unknown:
      raise TypeError(f'unknown attention option(s): {", ".join(unknown)}.')
  arrays = {n: arguments[n] for n in sequence_arrays() if arguments.get(n) is not None}
  opts = make_options(**{n: arguments[n] for n in names if n in arguments})
  _registry.check_implementation(opts.implementation)
  return arrays, opts


def _flatten_batch(x, batch_shape, batch: int, name: str, layout: str):
  """[B..., rest] -> [B, rest]."""
  if tuple(x.shape[: len(batch_shape)]) != tuple(batch_shape):
    raise ValueError(
      f'`{name}` {layout}: batch dims must be {tuple(batch_shape)} (those of '
      f'`query`); got shape {tuple(x.shape)}.'
    )
  return x.reshape((batch,) + x.shape[len(batch_shape) :])


def _logits_shaped(x, name, batch_shape, heads, q_len, kv_len):
  """Broadcastable to [B..., H, T, S] -> [B|1, H|1, T|1, S|1]."""
  target = tuple(batch_shape) + (heads, q_len, kv_len)
  layout = '[B..., H, T, S]'
  _checks.check_array(x, name, min_rank=0, layout=layout)
  if x.ndim > len(target):
    raise ValueError(
      f'`{name}` must broadcast to {layout} = {target}; got shape '
      f'{tuple(x.shape)} of higher rank.'
    )
  _checks.check_broadcastable(x, name, target, layout)
  x = jnp.reshape(x, (1,) * (len(target) - x.ndim) + tuple(x.shape))
  nb = len(batch_shape)
  if any(d != 1 for d in x.shape[:nb]):
    x = jnp.broadcast_to(x, target[:nb] + x.shape[nb:])
    return x.reshape((math.prod(batch_shape),) + x.shape[nb:])
  return x.reshape((1,) + x.shape[nb:])


def _check_positive_dims(query, key, value) -> None:
  dims = (
    ('query', query, -1, 'D'),
    ('query', query, -2, 'H'),
    ('key', key, -2, 'K'),
    ('value', value, -1, 'V'),
  )
  for name, x, axis, letter in dims:
    if x is not None and x.shape[axis] == 0:
      raise ValueError(
        f'`{name}`: the {letter} dim must be positive; got shape {tuple(x.shape)}.'
      )


def prepare(
  query,
  key,
  value,
  bias,
  mask,
  arrays: dict,
  dropout_rng,
  opts: Options,
  sinks=None,
  mods: Mods = Mods(),
) -> Prepared:
  """Check every argument against the others; flatten batch dims."""
  _checks.check_array(query, 'query', min_rank=3, layout='[B..., T, H, D]')
  _checks.check_array(key, 'key', min_rank=3, layout='[B..., S, K, D]')
  _checks.check_floating(query, 'query')
  operands = {'query': query, 'key': key}
  if value is not None:
    _checks.check_array(value, 'value', min_rank=3, layout='[B..., S, K, V]')
    operands['value'] = value
  _checks.check_same_dtype(operands)
  _check_positive_dims(query, key, value)
  batch_shape = tuple(query.shape[:-3])
  q_len, heads, head_dim = query.shape[-3:]
  batch = math.prod(batch_shape)
  if key.ndim != query.ndim:
    raise ValueError(
      f'`key` [B..., S, K, D] must have the rank of `query` [B..., T, H, D] '
      f'({query.ndim}); got key {tuple(key.shape)}, query '
      f'{tuple(query.shape)}.'
    )
  k = _flatten_batch(key, batch_shape, batch, 'key', '[B..., S, K, D]')
  kv_len, kv_heads, _ = k.shape[1:]
  _checks.check_dim(
    key, 'key', -1, head_dim, '[B..., S, K, D]', 'D (the head dim of query)'
  )
  if heads % kv_heads:
    raise ValueError(
      f'query heads H={heads} must be a multiple of key/value heads '
      f'K={kv_heads}; got query {tuple(query.shape)}, key {tuple(key.shape)}.'
    )
  v = None
  if value is not None:
    if value.ndim != query.ndim:
      raise ValueError(
        f'`value` [B..., S, K, V] must have rank {query.ndim}; got '
        f'{tuple(value.shape)}.'
      )
    v = _flatten_batch(value, batch_shape, batch, 'value', '[B..., S, K, V]')
    if v.shape[1:3] != (kv_len, kv_heads):
      raise ValueError(
        f'`value` [B..., S, K, V] must match `key` [B..., S, K, D] in S and '
        f'K; got value {tuple(value.shape)}, key {tuple(key.shape)}.'
      )
  q = query.reshape((batch, q_len, heads, head_dim))

  if bias is not None:
    _checks.check_array(bias, 'bias', min_rank=0, layout='[B..., H, T, S]')
    _checks.check_floating(bias, 'bias')
    bias = _logits_shaped(bias, 'bias', batch_shape, heads, q_len, kv_len)
  if mask is not None:
    _checks.check_array(mask, 'mask', min_rank=0, layout='[B..., H, T, S]')
    _checks.check_bool(mask, 'mask')
    mask = _logits_shaped(mask, 'mask', batch_shape, heads, q_len, kv_len)

  arrays = _sequence_arrays(arrays or {}, opts, batch_shape, q_len, kv_len)
  if opts.scale is None:
    opts = dataclasses.replace(opts, scale=1.0 / math.sqrt(head_dim))
  seed = None
  if dropout_rng is not None:
    _checks.check_prng_key(dropout_rng, 'dropout_rng')
  if opts.dropout_rate > 0.0:
    seed = jax.random.bits(dropout_rng, (batch, heads), jnp.uint32)
  vis = Visibility(
    **{name: getattr(opts, name) for name in STATIC_RULES},
    **arrays,
    kv_size=kv_len,
    mask=mask,
    batch_index=jnp.arange(batch, dtype=jnp.int32),
    head_index=jnp.arange(heads, dtype=jnp.int32),
  )
  dims = CallDims(batch, heads, q_len, kv_len)
  mask_mod, mod_blocks, opts = _block_mask(mods, opts, dims)
  if mask_mod is not None:
    mask_mod = Mod.trace(mask_mod, 'mask_mod', dims)
    if mod_blocks is not None:
      _check_broadcast_mod(mask_mod, mods.block_mask, dims)
  if 'q_offsets' in arrays or 'kv_offsets' in arrays:
    # The block states hold for positions 0..T-1 and 0..S-1: at other
    # positions the mod is tested element by element (same mask, no skips).
    mod_blocks = None
  vis = vis.replace(q_size=q_len, mask_mod=mask_mod, mod_blocks=mod_blocks)
  score_mod = None
  if mods.score_mod is not None:
    score_mod = Mod.trace(mods.score_mod, 'score_mod', dims)
  empty = batch == 0 or q_len == 0 or kv_len == 0
  if sinks is not None:
    _checks.check_array(sinks, 'sinks', min_rank=1, layout='[H]')
    _checks.check_floating(sinks, 'sinks')
    _checks.check_shape(sinks, 'sinks', (heads,), '[H] (one logit per query head)')
    sinks = _numerics.sink_logits(sinks)
  backend = jax.default_backend()
  return Prepared(
    q, k, v, bias, vis, seed, opts, batch_shape, empty, backend, sinks, score_mod
  )


# A per-sequence array's trailing dims, by axis kind (after B...).
_TAIL = {
  'sequence': lambda t, s: (),
  'rows': lambda t, s: (t,),
  'cols': lambda t, s: (s,),
}


def _sequence_arrays(arrays: dict, opts: Options, batch_shape, q_len, kv_len) -> dict:
  """The per-sequence arrays (``sequence_arrays()``) checked against the call
  and flattened to ``[B, ...]`` int32 (whatever integer dtype was given, as
  the kernels' row and column indices are); ``kv_segment_ids`` defaults to
  ``q_segment_ids`` when T == S."""
  if 'prefix_lengths' in arrays and not opts.is_causal:
    raise ValueError(
      '`prefix_lengths` [B...] makes a causal mask bidirectional inside the '
      'prefix; it needs is_causal=True.'
    )
  if 'kv_segment_ids' not in arrays and 'q_segment_ids' in arrays:
    if kv_len != q_len:
      raise ValueError(
        '`kv_segment_ids` [B..., S] is required when T != S; got T='
        f'{q_len}, S={kv_len}.'
      )
    arrays = dict(arrays, kv_segment_ids=arrays['q_segment_ids'])
  if 'q_segment_ids' not in arrays and 'kv_segment_ids' in arrays:
    raise ValueError('`kv_segment_ids` was given without `q_segment_ids`.')
  batch = math.prod(batch_shape)
  checked = {}
  for name, x in arrays.items():
    array = ARRAYS[name]
    tail = _TAIL[array.kind](q_len, kv_len)
    x = jnp.asarray(x)
    _checks.check_integer(x, name)
    _checks.check_shape(x, name, batch_shape + tail, array.layout)
    checked[name] = x.reshape((batch,) + tail).astype(jnp.int32)
  return checked


def _check_broadcast_mod(mask_mod: Mod, block_mask: BlockMask, dims: CallDims):
  """A block mask built for one batch row (or head) serves them all only
  if its mod does not depend on ``b`` (or ``h``)."""
  for argument, built, size, what in (
    ('b', block_mask.shape[0], dims.batch, 'B'),
    ('h', block_mask.shape[1], dims.heads, 'H'),
  ):
    if built == 1 < size and mask_mod.depends_on(argument):
      raise ValueError(
        f'`block_mask` was built for {what}=1 but its mask_mod depends on '
        f'`{argument}` and this call has {what}={size}: build it with '
        f'{what}={size}.'
      )


def _block_mask(mods: Mods, opts: Options, dims: CallDims):
  """``(mask_mod, states [B|1, H|1, nq, nk] or None, opts)``: the block
  mask checked against the call; its block sizes become the call's."""
  block_mask, mask_mod = mods.block_mask, mods.mask_mod
  batch, heads, q_len, kv_len = dims
  if block_mask is None:
    return mask_mod, None, opts
  if not isinstance(block_mask, BlockMask):
    raise TypeError(
      '`block_mask` must be a jattn.BlockMask (from jattn.create_block_mask); '
      f'got {type(block_mask).__name__}.'
    )
  b, h, t, s = block_mask.shape
  if (t, s) != (q_len, kv_len) or b not in (1, batch) or h not in (1, heads):
    raise ValueError(
      f'`block_mask` was built for (B, H, T, S) = {block_mask.shape}; this '
      f'call has ({batch}, {heads}, {q_len}, {kv_len}) (B and H may be 1).'
    )
  bq, bk = block_mask.block_sizes
  states_shape = (b, h, -(-t // bq), -(-s // bk))
  if tuple(block_mask.states.shape) != states_shape:
    raise ValueError(
      f'`block_mask.states` must be [B|1, H|1, nq, nk] = {states_shape} for '
      f'its shape and block sizes {block_mask.block_sizes}; got '
      f'{tuple(block_mask.states.shape)}.'
    )
  if opts.block_sizes not in (None, block_mask.block_sizes):
    raise ValueError(
      f'`block_sizes`={opts.block_sizes} differ from those `block_mask` was '
      f'built with, {block_mask.block_sizes}; leave `block_sizes` unset.'
    )
  opts = dataclasses.replace(opts, block_sizes=block_mask.block_sizes)
  return block_mask.mask_mod, block_mask.states, opts
