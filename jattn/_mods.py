"""User functions of one element: ``mask_mod`` and ``score_mod``.

A user writes them for one element, as in PyTorch's FlexAttention:

  mask_mod(b, h, q_idx, kv_idx) -> bool            True: may attend
  score_mod(score, b, h, q_idx, kv_idx) -> score   float32 logit

with int32 scalars ``b`` (flat batch row), ``h`` (query head) and the global
positions ``q_idx``, ``kv_idx``. Inside the jit of a call each is traced once
into a ``Mod``: its jaxpr and the arrays it captured, made explicit operands
(float ones are ``params``: differentiable through flash's and the ring's
custom VJPs; the rest ``fixed``), so nothing reaches a kernel by closure.
Kernels apply a ``Mod`` to whole blocks (``on_block``), vmapped.

Across the jit boundary a function is static (one trace per function
object) and a ``jax.tree_util.Partial`` is a pytree whose arrays are
operands (``split``/``join``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Var, jaxpr_as_fun

# Each mod's arguments, as it is called for one element.
SIGNATURES = {
  'mask_mod': ('b', 'h', 'q_idx', 'kv_idx'),
  'score_mod': ('score', 'b', 'h', 'q_idx', 'kv_idx'),
}
_RESULT = {'mask_mod': jnp.dtype(bool), 'score_mod': jnp.dtype(jnp.float32)}


# What JAX raises when a function needs a concrete value of a traced one.
_CONCRETE_VALUE_ERRORS = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerIntegerConversionError,
  jax.errors.TracerArrayConversionError,
)


class CallDims(NamedTuple):
  """The sizes of the call a mod is traced for: flat batch rows, query
  heads, query rows and key columns."""

  batch: int
  heads: int
  q_size: int
  kv_size: int


_CALL_DIMS = contextvars.ContextVar('jattn_call_dims', default=None)


def call_dims() -> CallDims | None:
  """The dims of the call whose mod is being traced (None outside a
  trace): ready mods check their arrays against them."""
  return _CALL_DIMS.get()


@contextlib.contextmanager
def _tracing_for(dims: CallDims | None):
  token = _CALL_DIMS.set(dims)
  try:
    yield
  finally:
    _CALL_DIMS.reset(token)


class _ByIdentity:
  """A static callable that is not hashable (a dataclass instance with
  ``__call__``), hashed and compared by identity, as functions are."""

  def __init__(self, fn):
    self.fn = fn

  def __hash__(self):
    return id(self.fn)

  def __eq__(self, other):
    return isinstance(other, _ByIdentity) and other.fn is self.fn


def split(fn):
  """``fn`` -> ``(static, leaves)``: a ``Partial``'s arrays travel as jit
  operands; any other callable (or None) is static."""
  if isinstance(fn, jax.tree_util.Partial):
    leaves, treedef = jax.tree.flatten(fn)
    return treedef, tuple(leaves)
  try:
    hash(fn)
  except TypeError:
    return _ByIdentity(fn), ()
  return fn, ()


def join(static, leaves):
  """The inverse of ``split``."""
  if isinstance(static, jax.tree_util.PyTreeDef):
    return jax.tree.unflatten(static, leaves)
  if isinstance(static, _ByIdentity):
    return static.fn
  return static


def same_function(a, b) -> bool:
  """Whether two mods are one function over the very same arrays (a
  ``Partial`` rebuilt over other arrays is another mod)."""
  (static_a, leaves_a), (static_b, leaves_b) = split(a), split(b)
  return (
    static_a == static_b
    and len(leaves_a) == len(leaves_b)
    and all(x is y for x, y in zip(leaves_a, leaves_b, strict=True))
  )


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('params', 'fixed'),
  meta_fields=('jaxpr', 'name', 'is_param'),
)
@dataclasses.dataclass(frozen=True)
class Mod:
  """A traced user function: ``jaxpr`` over its captured arrays (in order:
  ``is_param[i]`` says whether the i-th is from ``params`` or ``fixed``)."""

  jaxpr: object
  name: str
  is_param: tuple[bool, ...]
  params: tuple
  fixed: tuple

  @classmethod
  def trace(cls, fn, name: str, dims: CallDims | None = None) -> Mod:
    """Check and trace ``fn`` (``name`` is 'mask_mod' or 'score_mod') for
    a call of ``dims``."""
    arguments = SIGNATURES[name]
    if not callable(fn):
      raise TypeError(f'`{name}` must be callable; got {type(fn).__name__}.')
    _check_arity(fn, name, arguments)
    example = [jnp.zeros((), jnp.int32)] * len(arguments)
    if name == 'score_mod':
      example[0] = jnp.zeros((), jnp.float32)
    try:
      with _tracing_for(dims):
        closed = jax.make_jaxpr(fn)(*example)
    except _CONCRETE_VALUE_ERRORS as error:
      raise TypeError(
        f'`{name}` must be written with jnp operations on its traced scalar '
        f'arguments ({", ".join(arguments)}): a Python `if`, `bool()`, '
        '`int()` or `float()` of one cannot run inside a jit. Use '
        f'`jnp.where` or `jax.lax.cond` instead. ({type(error).__name__})'
      ) from error
    _check_result(closed.out_avals, name)
    consts = list(closed.consts)
    is_param = tuple(_is_float(c) for c in consts)
    params = tuple(c for c, p in zip(consts, is_param, strict=True) if p)
    fixed = tuple(c for c, p in zip(consts, is_param, strict=True) if not p)
    return cls(closed.jaxpr, name, is_param, params, fixed)

  def __call__(self, *scalars):
    params, fixed = iter(self.params), iter(self.fixed)
    consts = [next(params) if p else next(fixed) for p in self.is_param]
    (out,) = jaxpr_as_fun(ClosedJaxpr(self.jaxpr, consts))(*scalars)
    return out

  def depends_on(self, argument: str) -> bool:
    """Whether the result can change with ``argument`` ('b', 'h', ...):
    the argument reaches the output through the traced operations."""
    var = self.jaxpr.invars[SIGNATURES[self.name].index(argument)]
    live = {v for v in self.jaxpr.outvars if isinstance(v, Var)}
    for eqn in reversed(self.jaxpr.eqns):
      if any(v in live for v in eqn.outvars):
        live.update(v for v in eqn.invars if isinstance(v, Var))
    return var in live

  def with_params(self, params) -> Mod:
    return dataclasses.replace(self, params=tuple(params))

  def on_block(self, b, h, q_idx, kv_idx, score=None):
    """The mod over a block: ``q_idx [t]``, ``kv_idx [s]`` (global
    positions), ``score [t, s]`` for a score_mod -> ``[t, s]``."""
    b, h = (jnp.asarray(0 if x is None else x, jnp.int32) for x in (b, h))
    if score is None:
      row = jax.vmap(self, in_axes=(None, None, None, 0))
      return jax.vmap(row, in_axes=(None, None, 0, None))(b, h, q_idx, kv_idx)
    row = jax.vmap(self, in_axes=(0, None, None, None, 0))
    both = jax.vmap(row, in_axes=(0, None, None, 0, None))
    return both(score, b, h, q_idx, kv_idx)


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _check_arity(fn, name: str, arguments) -> None:
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # a builtin or C function: no signature
    return
  try:
    signature.bind(*arguments)
  except TypeError:
    raise TypeError(
      f'`{name}` must take {len(arguments)} positional arguments '
      f'({", ".join(arguments)}); got a function with signature {signature}.'
    ) from None


def _check_result(out_avals, name: str) -> None:
  want = _RESULT[name]
  what = 'a bool' if name == 'mask_mod' else 'a float32'
  got = ', '.join(str(a) for a in out_avals)
  ok = len(out_avals) == 1 and out_avals[0].shape == ()
  if not ok or jnp.dtype(out_avals[0].dtype) != want:
    raise TypeError(
      f'`{name}` must return {what} scalar for one element '
      f'({", ".join(SIGNATURES[name])} are int32 scalars'
      f'{"; score is a float32 scalar" if name == "score_mod" else ""}); '
      f'got {got or "nothing"}.'
    )


def score_block(mod: Mod | None, score, indices):
  """``score [t, s]`` through the score_mod at ``indices = (b, h, q_idx [t],
  kv_idx [s])`` (``Visibility.mod_indices``); None: as it is."""
  return score if mod is None else mod.on_block(*indices, score)


def score_block_vjp(mod: Mod | None, score, indices):
  """``(score_block(...), vjp)`` with ``vjp(d_modded) -> (d_score,
  d_params)``; without a mod the score and the identity."""
  if mod is None:
    return score, lambda d: (d, None)

  def apply(score, params):
    return mod.with_params(params).on_block(*indices, score)

  return jax.vjp(apply, score, mod.params)


@dataclasses.dataclass(frozen=True)
class _Combined:
  """Mask mods joined by ``op`` (``'and'``, ``'or'``), as one mod: the
  static parts of each mod (hashable: no retrace for new arrays) here, their
  arrays as the ``Partial``'s operands."""

  op: str
  statics: tuple

  def __call__(self, leaves, b, h, q_idx, kv_idx):
    each = [
      join(static, parts)(b, h, q_idx, kv_idx)
      for static, parts in zip(self.statics, leaves, strict=True)
    ]
    logical = jnp.logical_and if self.op == 'and' else jnp.logical_or
    return functools.reduce(logical, each)


def combine(op: str, mask_mods) -> jax.tree_util.Partial:
  """``mask_mods`` joined by ``op`` (``'and'`` or ``'or'``) into one
  ``mask_mod``, a ``Partial`` whose operands are all their arrays."""
  if not mask_mods:
    raise ValueError(f'{op}_masks needs at least one mask_mod.')
  for i, mod in enumerate(mask_mods):
    if not callable(mod):
      raise TypeError(f'{op}_masks: argument {i} is not a function; got {mod!r}.')
  parts = [split(mod) for mod in mask_mods]
  statics, leaves = tuple(s for s, _ in parts), tuple(x for _, x in parts)
  return jax.tree_util.Partial(_Combined(op, statics), leaves)
