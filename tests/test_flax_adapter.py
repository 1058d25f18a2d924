"""Flax's own modules with ``attention_fn=jattn.flax_attention_fn()`` against
Flax's default attention, given the same weights: float masks, causal masks,
autoregressive decoding with the cache, sown weights."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
from jattn import testing

B, T, E, H = 2, 6, 16, 4


def tokens(seed=1, length=T):
  return jax.random.normal(jax.random.key(seed), (B, length, E))


def nnx_pair(**kwargs):
  """(Flax's default, jattn's adapter) nnx.MultiHeadAttention, same weights."""
  make = lambda **extra: nnx.MultiHeadAttention(
    H, E, rngs=nnx.Rngs(0), **kwargs, **extra
  )
  return make(), make(attention_fn=jattn.flax_attention_fn())


@pytest.mark.parametrize('mask_dtype', [jnp.float32, jnp.bool_], ids=str)
def test_linen_with_flax_causal_mask(mask_dtype):
  x = tokens()
  mask = nn.make_causal_mask(jnp.ones((B, T)), dtype=mask_dtype)
  theirs = nn.MultiHeadDotProductAttention(num_heads=H)
  ours = nn.MultiHeadDotProductAttention(
    num_heads=H, attention_fn=jattn.flax_attention_fn()
  )
  params = theirs.init(jax.random.key(0), x)
  testing.assert_trees_close(
    ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask), jnp.float32
  )


def test_nnx_with_combined_float_masks():
  x = tokens()
  padding = nn.make_attention_mask(jnp.arange(T) < 4, jnp.arange(T) < 4)
  mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((B, T))), padding[None])
  assert mask.dtype == jnp.float32
  theirs, ours = nnx_pair(decode=False)
  # Rows 4 and 5 see nothing: Flax gives mean(V) there, jattn zeros by design.
  testing.assert_trees_close(
    ours(x, mask=mask)[:, :4], theirs(x, mask=mask)[:, :4], jnp.float32
  )
  chex.assert_trees_all_close(
    ours(x, mask=mask)[:, 4:], jnp.broadcast_to(ours.out.bias[...], (B, 2, E))
  )


def test_nnx_decode_with_cache_matches_flax():
  x = tokens(length=5)
  theirs, ours = nnx_pair(decode=True)
  for module in (theirs, ours):
    module.init_cache(x.shape)
  for i in range(x.shape[1]):
    step = x[:, i : i + 1]
    testing.assert_trees_close(ours(step), theirs(step), jnp.float32)
  # Decoding token by token equals causal attention over the whole sequence.
  full = ours(x, decode=False, mask=nn.make_causal_mask(jnp.ones((B, 5))))
  ours.init_cache(x.shape)
  steps = jnp.concatenate([ours(x[:, i : i + 1]) for i in range(5)], axis=1)
  testing.assert_trees_close(steps, full, jnp.float32)


def test_linen_decode_with_cache_matches_flax():
  x = tokens(length=4)
  kwargs = dict(num_heads=H, decode=True)
  theirs = nn.MultiHeadDotProductAttention(**kwargs)
  ours = nn.MultiHeadDotProductAttention(
    **kwargs, attention_fn=jattn.flax_attention_fn()
  )
  variables = theirs.init(jax.random.key(0), x)
  cache_a = cache_b = variables['cache']
  params = {'params': variables['params']}
  for i in range(4):
    step = x[:, i : i + 1]
    out_a, state_a = theirs.apply({**params, 'cache': cache_a}, step, mutable=['cache'])
    out_b, state_b = ours.apply({**params, 'cache': cache_b}, step, mutable=['cache'])
    cache_a, cache_b = state_a['cache'], state_b['cache']
    testing.assert_trees_close(out_b, out_a, jnp.float32)


def test_sown_weights_are_flax_weights_before_dropout():
  x = tokens()
  mask = nn.make_causal_mask(jnp.ones((B, T)))
  kwargs = dict(num_heads=H, dropout_rate=0.5, deterministic=False)
  theirs = nn.MultiHeadDotProductAttention(**kwargs)
  ours = nn.MultiHeadDotProductAttention(
    **kwargs, attention_fn=jattn.flax_attention_fn()
  )
  params = theirs.init(jax.random.key(0), x, mask=mask)
  rngs = {'dropout': jax.random.key(1)}
  sown = []
  for module in (theirs, ours):
    _, state = module.apply(
      params, x, mask=mask, sow_weights=True, rngs=rngs, mutable=['intermediates']
    )
    sown.append(state['intermediates']['attention_weights'][0])
  np.testing.assert_allclose(sown[1].sum(-1), 1.0, rtol=1e-5)
  testing.assert_trees_close(sown[1], sown[0], jnp.float32)


def test_nnx_sow_weights_with_float_mask():
  x = tokens()
  mask = nn.make_causal_mask(jnp.ones((B, T)))
  theirs, ours = nnx_pair(decode=False)
  weights = []
  for module in (theirs, ours):
    module(x, mask=mask, sow_weights=True)
    weights.append(nnx.pop(module, nnx.Intermediate)['attention_weights'][0])
  testing.assert_trees_close(weights[1], weights[0], jnp.float32)


def test_core_rejects_float_mask_with_a_useful_hint():
  q = jnp.ones((1, 3, 1, 4))
  with pytest.raises(TypeError, match=r'mask != 0'):
    jattn.dot_product_attention(q, q, q, mask=jnp.ones((3, 3)))


@pytest.mark.parametrize('fp32_softmax', [False, True])
def test_mixed_precision_follows_what_flax_asked_for(fp32_softmax):
  # Flax's test_mixed_precision_multihead_attention: bfloat16 compute sows
  # bfloat16 weights, unless force_fp32_for_softmax asks for float32 ones.
  x = tokens()
  kwargs = dict(num_heads=H, dtype=jnp.bfloat16, force_fp32_for_softmax=fp32_softmax)
  theirs = nn.MultiHeadDotProductAttention(**kwargs)
  ours = nn.MultiHeadDotProductAttention(
    **kwargs, attention_fn=jattn.flax_attention_fn()
  )
  results = []
  with jax.numpy_dtype_promotion('standard'):  # Flax mixes bf16 and f32 here
    params = theirs.init(jax.random.key(0), x)
    for module in (theirs, ours):
      out, state = module.apply(params, x, sow_weights=True, mutable=['intermediates'])
      results.append((out, state['intermediates']['attention_weights'][0]))
  (out_theirs, w_theirs), (out_ours, w_ours) = results
  assert w_ours.dtype == w_theirs.dtype
  assert w_ours.dtype == (jnp.float32 if fp32_softmax else jnp.bfloat16)
  assert out_ours.dtype == out_theirs.dtype
  testing.assert_trees_close(w_ours, w_theirs, jnp.bfloat16)
  testing.assert_trees_close(out_ours, out_theirs, jnp.bfloat16)


def test_nnx_bfloat16_sows_bfloat16_weights():
  x = tokens()
  theirs, ours = nnx_pair(decode=False, dtype=jnp.bfloat16)
  weights = []
  with jax.numpy_dtype_promotion('standard'):
    for module in (theirs, ours):
      module(x, sow_weights=True)
      weights.append(nnx.pop(module, nnx.Intermediate)['attention_weights'][0])
  assert weights[1].dtype == weights[0].dtype == jnp.bfloat16
  testing.assert_trees_close(weights[1], weights[0], jnp.bfloat16)


@pytest.mark.parametrize(
  'name', ['einsum_dot_general', 'qk_attn_weights_einsum', 'attn_weights_value_einsum']
)
def test_custom_einsum_is_a_clear_type_error(name):
  q = tokens().reshape(B, T, H, E // H)
  with pytest.raises(TypeError, match=rf'does not take a custom einsum \({name}\)'):
    jattn.flax_attention_fn()(q, q, q, **{name: jnp.einsum})


def test_linen_custom_einsum_module_is_refused():
  module = nn.MultiHeadDotProductAttention(
    num_heads=H,
    attention_fn=jattn.flax_attention_fn(),
    qk_attn_weights_einsum_cls=lambda: jnp.einsum,
    attn_weights_value_einsum_cls=lambda: jnp.einsum,
  )
  with pytest.raises(TypeError, match='qk_attn_weights_einsum, attn_weights_value'):
    module.init(jax.random.key(0), tokens())


@pytest.mark.parametrize(
  'precision, expected',
  [(None, 'DEFAULT'), ('highest', 'HIGHEST'), (jax.lax.Precision.HIGH, 'HIGH')],
)
def test_precision_sets_the_matmul_precision(precision, expected):
  q = tokens().reshape(B, T, H, E // H)
  fn = jattn.flax_attention_fn(implementation='reference')
  text = jax.jit(lambda q: fn(q, q, q, precision=precision)).lower(q).as_text()
  configs = [line for line in text.splitlines() if 'dot_general' in line]
  assert configs
  for line in configs:
    assert f'precision = [{expected}, {expected}]' in line, line


def test_bad_precision_names_the_argument():
  q = tokens().reshape(B, T, H, E // H)
  with pytest.raises(TypeError, match='`precision`'):
    jattn.flax_attention_fn()(q, q, q, precision='very')


def test_causal_cross_attention_is_top_left_as_in_flax():
  # Fewer queries than keys outside a decode step: query i sees keys 0..i,
  # as Flax's causal mask, jax.nn and PyTorch define it (flax#5591 changes
  # only the decode step: one query and the cache's mask).
  q = jax.random.normal(jax.random.key(2), (B, 2, H, 8))
  kv = jax.random.normal(jax.random.key(3), (B, 4, H, 8))
  tril = jnp.tril(jnp.ones((2, 4), bool))
  expected = nnx.dot_product_attention(q, kv, kv, mask=tril)
  ours = jattn.flax_attention_fn()(q, kv, kv, is_causal=True)
  testing.assert_trees_close(ours, expected, jnp.float32)
  theirs = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
  testing.assert_trees_close(ours, theirs, jnp.float32)
