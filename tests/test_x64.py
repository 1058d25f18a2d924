"""With ``jax_enable_x64`` on, as many scientific users run JAX: every kernel
agrees with ``jax.nn.dot_product_attention``, and Flax's decode works with
jattn's kernel (Flax's own ``test_autoregressive_decode_with_x64``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jattn
from jattn import cache as kv
from jattn import testing
from tests import helpers


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_kernels_equal_jax_nn(dtype):
  q, k, v = helpers.qkv(0, q_len=5, kv_len=11, dtype=dtype)
  mask = helpers.random_mask(1, (2, 1, 5, 11))
  lengths = jnp.array([11, 7], jnp.int32)  # jax.nn takes int32 only

  def ours(implementation):
    return lambda q, k, v: jattn.dot_product_attention(
      q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation=implementation
    )

  def theirs(q, k, v):
    with jax.numpy_dtype_promotion('standard'):  # jax.nn's lengths need it
      return jax.nn.dot_product_attention(
        q, k, v, mask=mask, key_value_seq_lengths=lengths
      )

  # jattn's logits and softmax are float32 whatever the inputs: float32's
  # tolerance for both. Gradients for one kernel per dtype (suite time).
  implementations = ('flash', 'reference', 'decode')
  graded = 'flash' if dtype == jnp.float64 else 'decode'
  for implementation in implementations:
    assert ours(implementation)(q, k, v).dtype == dtype
    testing.assert_functions_agree(
      theirs, ours(implementation), q, k, v, dtype=jnp.float32,
      check_grads=implementation == graded,
    )  # fmt: skip


def test_offsets_block_masks_and_a_cache_step():
  q, k, v = helpers.qkv(2, q_len=16, kv_len=16)
  block_mask = jattn.create_block_mask(
    lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, 16, 16, block_sizes=(8, 8)
  )
  testing.assert_implementations_agree(
    q, k, v, implementations=('reference', 'flash'), block_mask=block_mask
  )
  params = jattn.init_params(jax.random.key(3), 8, 2)
  x = jax.random.normal(jax.random.key(4), (2, 6, 8), jnp.float32)
  cache = kv.init_paged_cache(params, 2, num_pages=4, page_size=4, max_pages=2)
  cache, _ = kv.allocate_pages(cache, 6, jnp.ones(4, bool))
  out, _ = kv.multi_head_attention_step(params, x, cache)
  full = jattn.multi_head_attention(params, x, is_causal=True)
  testing.assert_trees_close(out, full, jnp.float32)


def test_flax_autoregressive_decode_with_jattn():
  # Flax's test, as Flax runs it: float64 inputs, float32 parameters.
  with jax.numpy_dtype_promotion('standard'):
    flax_decode_steps()


def flax_decode_steps():
  x = jnp.ones((1, 4, 4))
  module = nnx.MultiHeadAttention(
    in_features=4,
    num_heads=2,
    qkv_features=4,
    decode=True,
    rngs=nnx.Rngs(0),
    attention_fn=jattn.flax_attention_fn(),
  )
  module.init_cache(x.shape, dtype=x.dtype)
  assert module(x[:, :1]).shape == (1, 1, 4)
  assert module(x[:, 1:2]).shape == (1, 1, 4)
  linen = nn.MultiHeadDotProductAttention(
    num_heads=2, qkv_features=4, decode=True, attention_fn=jattn.flax_attention_fn()
  )
  variables = linen.init(jax.random.key(0), x, x, x)
  cache = variables['cache']
  for i in range(2):
    y, state = linen.apply(
      {'params': variables['params'], 'cache': cache},
      x[:, i : i + 1],
      mutable=['cache'],
    )
    cache = state['cache']
    assert y.shape == (1, 1, 4)
