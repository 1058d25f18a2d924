"""Attention sinks: one logit per query head in every row's denominator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import sharding, testing
from tests import helpers

SINKS = jnp.array([0.5, -1.0, 2.0, -jnp.inf])  # H = 4; a -inf sink is none


def numpy_with_sinks(q, k, v, sinks, visible):
  """float64 oracle: a sink is one more logit in each row's softmax, whose
  value is zero; ``visible [T, S]``."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(visible, logits, -np.inf)
  sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None],
                         logits.shape[:3] + (1,))  # fmt: skip
  both = np.concatenate([logits, sink], axis=-1)
  m = both.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  weights = np.exp(both - m)
  total = weights.sum(-1, keepdims=True)
  weights = np.where(total > 0, weights / np.where(total > 0, total, 1), 0)[..., :-1]
  lse = np.where(total[..., 0] > 0, m[..., 0] + np.log(total[..., 0]), -np.inf)
  return np.einsum('bhts,bshv->bthv', weights, v), lse.transpose(0, 2, 1)


@pytest.mark.parametrize('implementation', ['reference', 'flash'])
@pytest.mark.parametrize('causal', [False, True])
def test_values_and_residual_match_a_float64_oracle(implementation, causal):
  q, k, v = helpers.qkv(0, q_len=13, kv_len=13)
  out, lse = jattn.dot_product_attention(
    q,
    k,
    v,
    is_causal=causal,
    sinks=SINKS,
    implementation=implementation,
    block_sizes=(8, 8),
    return_residual=True,
  )
  visible = np.tri(13, dtype=bool) if causal else np.ones((13, 13), bool)
  expected_out, expected_lse = numpy_with_sinks(q, k, v, SINKS, visible)
  np.testing.assert_allclose(out, expected_out, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(lse, expected_lse, atol=2e-6, rtol=1e-5)


def test_sink_gradient_is_the_gradient_of_a_zero_valued_key():
  # A sink is a key of value zero whose logit is the sink: append a zero key
  # and value, and a bias column holding the sinks; jax.nn's gradient with
  # respect to that column, summed, is d sinks.
  q, k, v = helpers.qkv(1, q_len=11, kv_len=9, kv_heads=4)
  sinks = SINKS.at[3].set(0.3)
  zero = jnp.zeros((2, 1, 4, 8))
  cotangent = jax.random.normal(jax.random.key(3), (2, 11, 4, 8))

  def peer(q, k, v, sinks):
    column = jnp.broadcast_to(sinks[None, :, None, None], (1, 4, 11, 1))
    bias = jnp.concatenate([jnp.zeros((1, 4, 11, 9)), column], -1)
    out = jax.nn.dot_product_attention(
      q, jnp.concatenate([k, zero], 1), jnp.concatenate([v, zero], 1), bias
    )
    return jnp.sum(out * cotangent)

  def ours(q, k, v, sinks):
    out = jattn.dot_product_attention(q, k, v, sinks=sinks, block_sizes=(8, 8))
    return jnp.sum(out * cotangent)

  grads = jax.grad(ours, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  expected = jax.grad(peer, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  testing.assert_trees_close(grads, expected, jnp.float32, grads=True)


FEATURES = {  # combined: suite time
  'causal at offsets': dict(is_causal=True, q_offsets=jnp.array([4, 0])),
  'empty rows, dropout': dict(
    key_value_seq_lengths=jnp.array([0, 5]),
    dropout_rate=0.3,
    dropout_rng=jax.random.key(5),
  ),
  'window and segments': dict(
    local_window_size=(3, 2), q_segment_ids=jnp.repeat(jnp.arange(3), 5)[None, :13]
  ),
}


@pytest.mark.parametrize('feature', sorted(FEATURES), ids=str)
def test_flash_and_ring_match_the_reference(feature):
  """Values and gradients (q, k, v and sinks), GQA, odd lengths."""
  options = dict(FEATURES[feature])
  if 'q_segment_ids' in options:
    options['q_segment_ids'] = jnp.broadcast_to(options['q_segment_ids'], (2, 13))
  q, k, v = helpers.qkv(2, q_len=13, kv_len=13)
  mesh = sharding.make_mesh({'data': 2, 'model': 2, 'seq': 2})

  def attend(implementation):
    def fn(q, k, v, sinks):
      if implementation == 'ring':
        return sharding.ring_attention(
          q, k, v, mesh=mesh, sinks=sinks, block_sizes=(8, 8), **options
        )
      return jattn.dot_product_attention(
        q, k, v, sinks=sinks, implementation=implementation, block_sizes=(8, 8),
        **options,
      )  # fmt: skip

    return fn

  sinks = SINKS.at[3].set(-0.7)
  ring = ('ring',) if feature == 'causal at offsets' else ()  # suite time
  for implementation in ('flash', *ring):
    testing.assert_functions_agree(
      attend('reference'), attend(implementation), q, k, v, sinks, argnums=(0, 1, 2, 3)
    )


def test_empty_rows_are_zero_and_weights_leave_room_for_the_sink():
  q, k, v = helpers.qkv(3, q_len=6, kv_len=7)
  lengths = jnp.array([0, 4])
  out = jattn.dot_product_attention(q, k, v, sinks=SINKS, key_value_seq_lengths=lengths)
  np.testing.assert_array_equal(out[0], 0.0)
  grads = jax.grad(
    lambda s: jattn.dot_product_attention(
      q, k, v, sinks=s, key_value_seq_lengths=lengths
    ).sum()
  )(SINKS)
  assert np.isfinite(grads).all() and grads[3] == 0.0  # -inf sink: no weight
  weights = jattn.attention_weights(q, k, sinks=SINKS, key_value_seq_lengths=lengths)
  total = np.asarray(weights[1].sum(-1))  # [H, T]
  assert (total[:3] < 1 - 1e-3).all()
  np.testing.assert_allclose(total[3], 1.0, rtol=1e-6)  # -inf sink takes nothing


def test_sinks_are_checked_and_refused_by_xla():
  q, k, v = helpers.qkv(0)
  with pytest.raises(ValueError, match=r'`sinks` must have shape \[H\]'):
    jattn.dot_product_attention(q, k, v, sinks=jnp.zeros(3))
  with pytest.raises(TypeError, match='`sinks` must have a floating dtype'):
    jattn.dot_product_attention(q, k, v, sinks=jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"'xla' cannot take.*sinks"):
    jattn.dot_product_attention(q, k, v, sinks=jnp.zeros(4), implementation='xla')
