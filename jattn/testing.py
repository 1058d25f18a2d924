"""Equivalence assertions between attention implementations (chex-based).

For users who swap implementations or parameterisations, and the backbone of
jattn's own tests. Tolerances are per input dtype and apply to values and to
gradients, both compared in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from jattn.attention import dot_product_attention

# (atol, rtol) by input dtype: float32 differs by accumulation order only;
# half precision by the rounding of inputs, outputs and the weighted sum.
TOLERANCES = {
  jnp.dtype(jnp.float32): (2e-5, 2e-5),
  jnp.dtype(jnp.bfloat16): (3e-2, 3e-2),
  jnp.dtype(jnp.float16): (4e-3, 4e-3),
}
GRAD_TOLERANCES = {
  jnp.dtype(jnp.float32): (1e-4, 1e-4),
  jnp.dtype(jnp.bfloat16): (8e-2, 8e-2),
  jnp.dtype(jnp.float16): (1e-2, 1e-2),
}


def tolerance(dtype, *, grads: bool = False) -> dict[str, float]:
  """``{'atol', 'rtol'}`` for arrays computed from inputs of ``dtype``."""
  table = GRAD_TOLERANCES if grads else TOLERANCES
  atol, rtol = table.get(jnp.dtype(dtype), table[jnp.dtype(jnp.float32)])
  return {'atol': atol, 'rtol': rtol}


def assert_trees_close(actual, expected, dtype, *, grads: bool = False) -> None:
  """Every leaf close in float32 within the tolerance for ``dtype``."""
  to_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  chex.assert_trees_all_close(
    to_f32(actual), to_f32(expected), **tolerance(dtype, grads=grads)
  )


def compiled_gradient(fn: Callable, *args):
  """The jit-compiled gradient of ``sum(fn(*args))`` with respect to every
  argument; ``args`` may be arrays or ``jax.ShapeDtypeStruct``s."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
  return grad.lower(*args).compile()


def temp_bytes(compiled) -> int:
  """Temporary memory of a compiled program, from ``memory_analysis()``."""
  return compiled.memory_analysis().temp_size_in_bytes


def _value_and_grads(fn, args, argnums, cotangent_seed, jit):
  """``(fn(*args), gradients)``, as one compiled program (the forward once)
  or op by op."""

  def loss(*a):
    out = fn(*a)
    key = jax.random.key(cotangent_seed)
    cotangent = jax.random.normal(key, out.shape, jnp.float32)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  value_and_grad = jax.value_and_grad(loss, argnums, has_aux=True)
  (_, out), grads = (jax.jit(value_and_grad) if jit else value_and_grad)(*args)
  return out, grads


def assert_functions_agree(
  fn_a: Callable,
  fn_b: Callable,
  *args,
  argnums: Sequence[int] = (0, 1, 2),
  dtype=None,
  check_grads: bool = True,
  cotangent_seed: int = 0,
  jit: bool = True,
) -> None:
  """``fn_a(*args)`` and ``fn_b(*args)`` agree, and so do their gradients.

  Gradients are of ``sum(out * c)`` for a fixed random cotangent ``c`` with
  respect to ``args[argnums]``. ``dtype`` picks the tolerance (default: the
  dtype of the first argument). Each function's value and gradients are one
  ``jax.jit`` program; ``jit=False`` runs them op by op instead (for a
  function that cannot be compiled whole).
  """
  dtype = args[0].dtype if dtype is None else dtype
  if not check_grads:
    assert_trees_close(fn_a(*args), fn_b(*args), dtype)
    return
  argnums = tuple(argnums)
  out_a, grads_a = _value_and_grads(fn_a, args, argnums, cotangent_seed, jit)
  out_b, grads_b = _value_and_grads(fn_b, args, argnums, cotangent_seed, jit)
  chex.assert_equal_shape([out_a, out_b])
  assert_trees_close(out_a, out_b, dtype)
  assert_trees_close(grads_a, grads_b, dtype, grads=True)


def assert_implementations_agree(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  implementations: Sequence[str] = ('reference', 'xla'),
  check_grads: bool = True,
  **kwargs,
) -> None:
  """``jattn.dot_product_attention`` gives the same values and gradients
  (query, key, value and bias) under each of ``implementations``."""
  args = (query, key, value) + (() if bias is None else (bias,))
  argnums = tuple(range(len(args)))

  def with_impl(name):
    def fn(q, k, v, b=None):
      return dot_product_attention(q, k, v, b, mask, implementation=name, **kwargs)

    return fn

  first, *others = implementations
  for other in others:
    assert_functions_agree(
      with_impl(first),
      with_impl(other),
      *args,
      argnums=argnums,
      check_grads=check_grads,
    )
