"""A public call, split before its jit: its arrays (a pytree, the dynamic
argument), its validated static options, and the static parts of its user
functions. Runs on the caller's values, so what can only be checked there
(an implementation's name, a mask_mod against its block mask's) is."""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax.numpy as jnp

from jattn import _registry
from jattn._mods import same_function, split
from jattn._options import make_options
from jattn._types import Options
from jattn._visibility import sequence_arrays
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
