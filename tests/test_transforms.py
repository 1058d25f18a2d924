"""jit, no-jit and pmap variants; no retrace on repeated calls."""

import chex
import jax
import jax.numpy as jnp

import jattn
from jattn import testing
from tests import helpers


class CoreVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_core(self):
    q, k, v = helpers.qkv(0, batch=(1,))
    mask = helpers.random_mask(0, (1, 1, 6, 7))
    fn = self.variant(
      lambda q, k, v, m: jattn.dot_product_attention(q, k, v, mask=m, is_causal=True)
    )
    out = fn(q, k, v, mask)
    expected = jattn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, implementation='reference'
    )
    testing.assert_trees_close(out, expected, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_multi_head(self):
    params = jattn.init_params(jax.random.key(0), 16, 4, num_kv_heads=2)
    x = jax.random.normal(jax.random.key(1), (1, 5, 16))
    fn = self.variant(lambda p, x: jattn.multi_head_attention(p, x, is_causal=True))
    testing.assert_trees_close(
      fn(params, x),
      jattn.multi_head_attention(params, x, is_causal=True),
      jnp.float32,
    )

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_grad(self):
    q, k, v = helpers.qkv(0, batch=(1,))
    loss = lambda q, k, v: jattn.dot_product_attention(q, k, v).sum()
    grads = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    testing.assert_trees_close(
      grads, jax.grad(loss, argnums=(0, 1, 2))(q, k, v), jnp.float32, grads=True
    )


def test_no_retrace_on_repeated_calls():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, lengths):
    return jattn.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=lengths
    )

  for seed in range(3):
    q, k, v = helpers.qkv(seed)
    step(q, k, v, jnp.array([3, 7]))


def test_public_function_caches_its_compilation():
  call = lambda q, k, v: jattn.dot_product_attention(q, k, v, local_window_size=[2, 1])
  shapes = dict(q_len=5, kv_len=11, heads=2, kv_heads=1)  # used by no other test
  assert helpers.compilations(call, *helpers.qkv(0, **shapes)) > 0
  for seed in range(1, 3):  # new values, same shapes and options: no compilation
    assert helpers.compilations(call, *helpers.qkv(seed, **shapes)) == 0
