"""Tiny cases whose answers were worked out on paper."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import jattn

IMPLS = ['reference', 'xla', None]


def as_bthd(x):
  """[T, D] -> [1, T, 1, D]."""
  return jnp.asarray(x, jnp.float32)[None, :, None, :]


@pytest.mark.parametrize('impl', IMPLS)
def test_two_keys(impl):
  # logits [1, 0] -> weights [e, 1] / (e + 1); out = w0 [1, 2] + w1 [3, 4].
  q, k, v = as_bthd([[1, 0]]), as_bthd([[1, 0], [0, 1]]), as_bthd([[1, 2], [3, 4]])
  out = jattn.dot_product_attention(q, k, v, scale=1.0, implementation=impl)
  w0 = math.e / (math.e + 1)
  expected = [w0 * 1 + (1 - w0) * 3, w0 * 2 + (1 - w0) * 4]
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0], [1.5378828, 2.5378828], rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_causal_uniform(impl):
  # Zero queries: uniform weights over the visible keys.
  q = as_bthd(np.zeros((3, 2)))
  v = as_bthd([[1, 2], [3, 4], [5, 9]])
  out = jattn.dot_product_attention(q, q, v, is_causal=True, implementation=impl)
  np.testing.assert_allclose(out[0, :, 0], [[1, 2], [2, 3], [3, 5]], rtol=1e-6)


@pytest.mark.parametrize('impl', IMPLS)
def test_fully_masked_row_is_zero(impl):
  q = as_bthd([[1, 0], [0, 1]])
  v = as_bthd([[1, 2], [3, 4]])
  mask = jnp.array([[True, True], [False, False]])
  out = jattn.dot_product_attention(q, q, v, mask=mask, implementation=impl)
  np.testing.assert_array_equal(out[0, 1, 0], [0.0, 0.0])
  assert float(jnp.abs(out[0, 0, 0]).sum()) > 0


@pytest.mark.parametrize('impl', IMPLS)
def test_window_and_bias(impl):
  # Window (0, 0): each query sees only its own key -> out = v.
  q = as_bthd([[1, 0], [0, 1], [1, 1]])
  v = as_bthd([[1, 2], [3, 4], [5, 6]])
  out = jattn.dot_product_attention(q, q, v, local_window_size=0, implementation=impl)
  np.testing.assert_allclose(out[0, :, 0], v[0, :, 0], rtol=1e-6)
  # A bias of log 3 on key 1 with zero logits: weights [1, 3] / 4.
  zeros = as_bthd(np.zeros((1, 2)))
  bias = jnp.log(jnp.array([[1.0, 3.0]]))
  out = jattn.dot_product_attention(
    zeros,
    as_bthd(np.zeros((2, 2))),
    as_bthd([[4, 0], [0, 4]]),
    bias,
    implementation=impl,
  )
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 3.0], rtol=1e-6)


def test_gqa_heads_share_kv():
  # H=2, K=1: both query heads read the single KV head.
  q = jnp.array([[[[1.0, 0.0], [0.0, 1.0]]]])  # [B=1, T=1, H=2, D=2]
  k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, S=2, K=1, 2]
  v = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
  out = jattn.dot_product_attention(q, k, v, scale=1.0, implementation='reference')
  w = math.e / (math.e + 1)
  np.testing.assert_allclose(out[0, 0], [[w, 1 - w], [1 - w, w]], rtol=1e-6)


def test_soft_cap_and_lengths():
  # cap 1: logits [2, 0] -> [tanh 2, 0]; key_value_seq_lengths=1 hides key 1.
  q, k = as_bthd([[2, 0]]), as_bthd([[1, 0], [0, 1]])
  v = as_bthd([[1, 0], [0, 1]])
  out = jattn.dot_product_attention(
    q, k, v, scale=1.0, logits_soft_cap=1.0, implementation='reference'
  )
  w = math.exp(math.tanh(2)) / (math.exp(math.tanh(2)) + 1)
  np.testing.assert_allclose(out[0, 0, 0], [w, 1 - w], rtol=1e-6)
  out = jattn.dot_product_attention(
    q, k, v, key_value_seq_lengths=jnp.array([1]), implementation='reference'
  )
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.0], rtol=1e-6)
