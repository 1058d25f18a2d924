"""Masking biases, huge and infinite, against a float64 NumPy oracle; the
log-sum-exp residual (``return_residual``) against ``jax.nn``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import testing
from tests import helpers

IMPLEMENTATIONS = ('reference', 'flash', 'xla', None)
BIASES = (-1e4, -1e9, -1e30, float(np.finfo(np.float32).min), -np.inf)
T, S, D = 16, 24, 8


def oracle(q, k, v, bias, d_out):
  """float64 attention and its gradients for one head, by hand.

  q [T, D], k [S, D], v [S, V], bias [T, S], d_out [T, V] -> (out, dq, dk,
  dv, dbias). Rows whose every logit is -inf have zero weights.
  """
  q, k, v, bias, d_out = (np.asarray(x, np.float64) for x in (q, k, v, bias, d_out))
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = scale * q @ k.T + bias
  m = logits.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(logits - m)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  dp = d_out @ v.T
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  return p @ v, scale * ds @ k, scale * ds.T @ q, p.T @ d_out, ds


def run(implementation, q, k, v, bias, d_out):
  """jattn's (out, dq, dk, dv, dbias) for the same single-head problem."""

  def f(q, k, v, bias):
    out = jattn.dot_product_attention(
      q[None, :, None],
      k[None, :, None],
      v[None, :, None],
      bias,
      implementation=implementation,
      block_sizes=(8, 8) if implementation == 'flash' else None,
    )
    return out[0, :, 0]

  out, vjp = jax.vjp(f, q, k, v, bias)
  return (out, *vjp(d_out))


def biased(value, whole_rows=(2, 9), partial=((5, slice(3, 20)), (11, slice(0, 23)))):
  bias = np.zeros((T, S), np.float32)
  for row in whole_rows:
    bias[row] = value
  for row, cols in partial:
    bias[row, cols] = value
  return jnp.asarray(bias)


@pytest.mark.parametrize('value', BIASES, ids=str)
@pytest.mark.parametrize('implementation', IMPLEMENTATIONS, ids=str)
def test_masking_bias_against_float64(implementation, value):
  q, k, v = (
    x[0, :, 0]
    for x in helpers.qkv(
      3, batch=(1,), q_len=T, kv_len=S, heads=1, kv_heads=1, head_dim=D
    )
  )
  bias = biased(value)
  d_out = jax.random.normal(jax.random.key(9), (T, D))
  truth = oracle(q, k, v, bias, d_out)
  ours = run(implementation, q, k, v, bias, d_out)
  reference = run('reference', q, k, v, bias, d_out)
  for name, a, r, t in zip(
    ('out', 'dq', 'dk', 'dv', 'dbias'), ours, reference, truth, strict=True
  ):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    assert np.all(np.isfinite(a)), name
    # The answer is the float32 reference's; no further from the truth.
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4, err_msg=name)
    assert np.abs(a - t).max() <= 2 * np.abs(r - t).max() + 1e-4, name
  if value == -np.inf:  # rows with nothing to attend to: zeros
    np.testing.assert_array_equal(np.asarray(ours[0])[[2, 9]], 0.0)


@pytest.mark.parametrize('value', (-1e4, -1e30, -np.inf), ids=str)
def test_masking_bias_matches_truth_where_float32_can(value):
  # Partial rows only: masked keys get weight exactly 0, so float32 meets
  # float64 (whole rows of -1e9 are uniform in float32 but not in float64).
  q, k, v = (
    x[0, :, 0]
    for x in helpers.qkv(
      4, batch=(1,), q_len=T, kv_len=S, heads=1, kv_heads=1, head_dim=D
    )
  )
  bias = biased(value, whole_rows=())
  d_out = jax.random.normal(jax.random.key(8), (T, D))
  truth = oracle(q, k, v, bias, d_out)
  for implementation in IMPLEMENTATIONS:
    for a, t in zip(run(implementation, q, k, v, bias, d_out), truth, strict=True):
      np.testing.assert_allclose(np.asarray(a, np.float64), t, atol=1e-4, rtol=1e-3)


def test_repro_from_the_report():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 16, 1, 8)) for i in range(3))
  bias = jnp.zeros((16, 16)).at[2, :].set(jnp.finfo(jnp.float32).min)
  for implementation in IMPLEMENTATIONS:
    f = lambda v, i=implementation: jattn.dot_product_attention(
      q, k, v, bias, implementation=i
    )[0, 2].sum()
    np.testing.assert_allclose(jax.grad(f)(v).sum(), 8.0, rtol=1e-5)


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS, ids=str)
def test_residual_matches_jax(implementation):
  q, k, v = helpers.qkv(5, batch=(2,), q_len=6, kv_len=6, heads=4, kv_heads=2)
  out, lse = jattn.dot_product_attention(
    q, k, v, is_causal=True, implementation=implementation, return_residual=True
  )
  ref_out, ref_lse = jax.nn.dot_product_attention(
    q, k, v, is_causal=True, return_residual=True
  )
  assert lse.shape == ref_lse.shape == (2, 6, 4)
  assert lse.dtype == ref_lse.dtype
  testing.assert_trees_close((out, lse), (ref_out, ref_lse), jnp.float32)


def test_residual_batch_dims_dtype_and_empty_rows():
  q, k, v = helpers.qkv(6, batch=(2, 3), dtype=jnp.bfloat16)
  mask = jnp.ones((6, 7), bool).at[1].set(False)
  results = [
    jattn.dot_product_attention(
      q, k, v, mask=mask, implementation=impl, return_residual=True
    )
    for impl in IMPLEMENTATIONS
  ]
  for _, lse in results:
    assert lse.shape == (2, 3, 6, 4) and lse.dtype == jnp.bfloat16
    assert bool(jnp.all(lse[:, :, 1] == -jnp.inf))
    assert bool(jnp.all(jnp.isfinite(jnp.delete(lse, 1, axis=2))))
  for out, lse in results[1:]:
    testing.assert_trees_close((out, lse), results[0], jnp.bfloat16)


def test_residual_has_no_gradient_and_jits():
  q, k, v = helpers.qkv(7)
  f = jax.jit(
    lambda q: jattn.dot_product_attention(q, k, v, return_residual=True)[1].sum()
  )
  np.testing.assert_array_equal(jax.grad(f)(q), 0.0)
