"""The multi-head function and both wrappers against Flax's own modules."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jattn
import jattn.linen
import jattn.nnx
from jattn import _params, testing
from tests import helpers

E, H = 16, 4


def inputs(dtype=jnp.float32, batch=2, length=5, features=E, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, features), dtype)


def flax_nnx_with(params, num_kv_heads=None, **kwargs):
  """flax.nnx.MultiHeadAttention holding ``params``."""
  heads, head_dim = params['query']['kernel'].shape[1:]
  module = nnx.MultiHeadAttention(
    heads,
    params['query']['kernel'].shape[0],
    qkv_features=heads * head_dim,
    out_features=params['out']['kernel'].shape[-1],
    num_kv_heads=num_kv_heads,
    decode=False,
    rngs=nnx.Rngs(0),
    **kwargs,
  )
  for name, projection in params.items():
    for leaf, array in projection.items():
      getattr(getattr(module, name), leaf)[...] = array
  return module


@pytest.mark.parametrize('dtype', helpers.DTYPES, ids=lambda d: d.__name__)
def test_matches_flax_linen(dtype):
  x = inputs(dtype)
  params = jattn.init_params(jax.random.key(0), E, H)
  flax_module = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E)
  mask = nn.make_causal_mask(jnp.ones((2, 5)), dtype=jnp.bool_)
  ours = lambda p, x: jattn.multi_head_attention(p, x, mask=mask)
  theirs = lambda p, x: flax_module.apply({'params': p}, x, mask=mask)
  with jax.numpy_dtype_promotion('standard'):
    testing.assert_functions_agree(ours, theirs, params, x, argnums=(0, 1), dtype=dtype)


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])
def test_matches_flax_nnx_with_gqa(num_kv_heads):
  x, y = inputs(), inputs(length=7, seed=2)
  params = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=num_kv_heads)
  module = flax_nnx_with(params, num_kv_heads=num_kv_heads)
  ours = jattn.multi_head_attention(params, x, y)
  testing.assert_trees_close(ours, module(x, y), jnp.float32)


def test_wrappers_match_pure_function_and_flax():
  x = inputs()
  linen_module = jattn.linen.MultiHeadAttention(num_heads=H)
  params = linen_module.init(jax.random.key(0), x)['params']
  pure = jattn.multi_head_attention(params, x, is_causal=True)
  linen_out = linen_module.apply({'params': params}, x, is_causal=True)
  nnx_module = jattn.nnx.MultiHeadAttention.from_params(params)
  flax_out = nn.MultiHeadDotProductAttention(num_heads=H).apply(
    {'params': params}, x, mask=nn.make_causal_mask(jnp.ones((2, 5)), dtype=jnp.bool_)
  )
  chex.assert_trees_all_close(linen_out, pure)
  chex.assert_trees_all_close(nnx_module(x, is_causal=True), pure)
  testing.assert_trees_close(flax_out, pure, jnp.float32)


def test_flax_modules_excluding_empty_rows():
  # Flax returns mean(V) for rows that see nothing; jattn returns zeros there.
  x = inputs()
  params = jattn.init_params(jax.random.key(0), E, H)
  mask = jnp.array([True, True, False, True, True])[None, None, :, None]
  ours = jattn.multi_head_attention(params, x, mask=mask)
  flax_out = flax_nnx_with(params)(x, mask=mask)
  testing.assert_trees_close(
    ours[:, [0, 1, 3, 4]], flax_out[:, [0, 1, 3, 4]], jnp.float32
  )
  out_bias = params['out']['bias']
  chex.assert_trees_all_close(ours[:, 2], jnp.broadcast_to(out_bias, (2, E)))


def test_weight_round_trips():
  x = inputs()
  linen_params = jattn.linen.MultiHeadAttention(
    num_heads=H, num_kv_heads=2, out_features=12
  ).init(jax.random.key(0), x)
  module = jattn.nnx.MultiHeadAttention.from_params(linen_params['params'])
  chex.assert_trees_all_equal(module.to_params(), linen_params['params'])
  back = jattn.nnx.MultiHeadAttention(
    H, E, num_kv_heads=2, out_features=12, rngs=nnx.Rngs(3)
  )
  again = jattn.nnx.MultiHeadAttention.from_params(back.to_params())
  chex.assert_trees_all_equal(again.to_params(), back.to_params())
  chex.assert_trees_all_equal(
    nnx.to_pure_dict(nnx.state(module, nnx.Param)), linen_params['params']
  )


def test_flax_attention_fn_adapter():
  x = inputs()
  params = jattn.init_params(jax.random.key(0), E, H)
  module = nn.MultiHeadDotProductAttention(
    num_heads=H, attention_fn=jattn.flax_attention_fn()
  )
  mask = jnp.array([True, True, False, True, True])[None, None, :, None]
  out = module.apply({'params': params}, x, mask=mask)
  chex.assert_trees_all_close(out, jattn.multi_head_attention(params, x, mask=mask))
  _, state = module.apply(
    {'params': params}, x, sow_weights=True, mutable=['intermediates']
  )
  (weights,) = state['intermediates']['attention_weights']
  assert weights.shape == (2, H, 5, 5)
  nnx_module = flax_nnx_with(params, attention_fn=jattn.flax_attention_fn())
  chex.assert_trees_all_close(nnx_module(x), jattn.multi_head_attention(params, x))


@pytest.mark.parametrize('use_bias', [True, False])
def test_multi_head_attention_weights_reproduce_the_output(use_bias):
  """Weights times the projected values, projected out, are the layer's output;
  and they equal what Flax sows for the same parameters."""
  x = inputs()
  params = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=2, use_bias=use_bias)
  segments = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0]])
  options = dict(q_segment_ids=segments, kv_segment_ids=segments)
  weights = jattn.multi_head_attention_weights(params, x, **options)
  assert weights.shape == (2, H, 5, 5) and weights.dtype == jnp.float32
  value = jnp.einsum('bse,ekv->bskv', x, params['value']['kernel'])
  if use_bias:
    value = value + params['value']['bias'][None, None]
  value = jnp.repeat(value, H // 2, axis=2)  # query head h reads KV head h // G
  mixed = jnp.einsum('bhts,bshv->bthv', weights, value)
  out = jnp.einsum('bthv,hvf->btf', mixed, params['out']['kernel'])
  if use_bias:
    out = out + params['out']['bias'][None, None]
  chex.assert_trees_all_close(
    out, jattn.multi_head_attention(params, x, **options), atol=1e-5, rtol=1e-5
  )
  if use_bias:  # Flax linen sows the same weights (it has no GQA: K = H here)
    params = jattn.init_params(jax.random.key(1), E, H)
    module = nn.MultiHeadDotProductAttention(num_heads=H)
    mask = jattn.segment_mask(segments)
    _, state = module.apply(
      {'params': params}, x, mask=mask, sow_weights=True, mutable=['intermediates']
    )
    (sown,) = state['intermediates']['attention_weights']
    weights = jattn.multi_head_attention_weights(params, x, **options)
    chex.assert_trees_all_close(weights, sown, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match='inputs_q'):
    jattn.multi_head_attention_weights(params, x[..., :3])


def test_dropout_in_wrappers():
  x = inputs()
  module = jattn.nnx.MultiHeadAttention(
    H, E, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1)
  )
  a, b = module(x), module(x)
  assert float(jnp.abs(a - b).max()) > 1e-3  # the stream advances
  chex.assert_trees_all_close(
    module(x, deterministic=True), module(x, deterministic=True)
  )
  module.eval()
  chex.assert_trees_all_close(module(x), module(x))
  linen_module = jattn.linen.MultiHeadAttention(num_heads=H, dropout_rate=0.5)
  params = linen_module.init(jax.random.key(0), x, deterministic=True)
  out = linen_module.apply(
    params, x, deterministic=False, rngs={'dropout': jax.random.key(1)}
  )
  det = linen_module.apply(params, x, deterministic=True)
  assert float(jnp.abs(out - det).max()) > 1e-3


def test_nnx_jit_grad_and_bf16_compute():
  # bfloat16 compute on float32 parameters: the float32 module's values and
  # gradients within bfloat16's tolerance.
  x = inputs()

  @nnx.jit
  def out_and_grads(m, x):
    loss = lambda m: m(x).astype(jnp.float32).sum()
    return m(x), nnx.grad(loss)(m)

  results = {}
  for dtype in (jnp.bfloat16, jnp.float32):
    module = jattn.nnx.MultiHeadAttention(H, E, dtype=dtype, rngs=nnx.Rngs(0))
    out, grads = out_and_grads(module, x)
    assert out.dtype == dtype
    results[dtype] = out, nnx.state(grads, nnx.Param)
  (out, grads), (out32, grads32) = results[jnp.bfloat16], results[jnp.float32]
  assert jax.tree.leaves(grads)[0].dtype == jnp.float32  # parameters stay float32
  testing.assert_trees_close(out, out32.astype(jnp.bfloat16), jnp.bfloat16)
  testing.assert_trees_close(grads, grads32, jnp.bfloat16, grads=True)


def test_cross_attention_and_feature_sizes():
  params = jattn.init_params(
    jax.random.key(0),
    16,
    2,
    head_dim=3,
    value_head_dim=5,
    out_features=7,
    kv_features=9,
  )
  x, y = inputs(), inputs(length=4, features=9)
  out = jattn.multi_head_attention(
    params, x, y, key_value_seq_lengths=jnp.array([2, 4])
  )
  assert out.shape == (2, 5, 7)
  assert jax.tree.map(jnp.shape, params)['out'] == {'kernel': (2, 5, 7), 'bias': (7,)}


def test_pure_functions_vmap_and_pmap():
  params = jattn.init_params(jax.random.key(0), E, H)
  x = inputs(batch=8)
  batched = jattn.multi_head_attention(params, x)
  per_example = jax.vmap(lambda xi: jattn.multi_head_attention(params, xi))(x)
  testing.assert_trees_close(per_example, batched, jnp.float32)
  pmapped = jax.pmap(lambda xi: jattn.multi_head_attention(params, xi))(
    x.reshape((8, 1) + x.shape[1:])
  )
  testing.assert_trees_close(pmapped.reshape(batched.shape), batched, jnp.float32)


def test_wrappers_share_one_declaration_of_hyperparameters():
  declared = dataclasses.fields(jattn.multihead.Hyperparameters)
  linen_fields = {f.name: f for f in dataclasses.fields(jattn.linen.MultiHeadAttention)}
  for field in declared:
    if field.name in ('in_features', 'kv_features'):
      continue  # linen reads them from the inputs
    assert field.name in jattn.linen.HYPERPARAMETERS
    assert linen_fields[field.name].default == field.default, field.name
  x = inputs(length=3)
  options = dict(head_dim=6, num_kv_heads=2, value_head_dim=5, out_features=7)
  linen_params = jattn.linen.MultiHeadAttention(num_heads=H, **options).init(
    jax.random.key(0), x
  )['params']
  nnx_params = jattn.nnx.MultiHeadAttention(H, E, rngs=nnx.Rngs(0), **options)
  shapes = jattn.param_shapes(E, H, **options)
  for tree in (linen_params, nnx_params.to_params()):
    assert jax.tree.map(jnp.shape, tree) == shapes


def test_sinks_are_a_learnable_parameter_of_the_function_and_wrappers():
  x = inputs()
  params = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=2, use_sinks=True)
  assert jattn.param_shapes(E, H, use_sinks=True)['sinks'] == (H,)
  chex.assert_trees_all_equal(params['sinks'], jnp.zeros(H))
  params['sinks'] = jnp.array([0.5, -1.0, 2.0, 0.0])
  q, k, v, _ = _params.projections(params, x, None, None, None)
  attended = jattn.dot_product_attention(q, k, v, is_causal=True, sinks=params['sinks'])
  expected = jnp.einsum('bthv,hvf->btf', attended, params['out']['kernel'])
  expected = expected + params['out']['bias'][None, None]
  out = jattn.multi_head_attention(params, x, is_causal=True)
  chex.assert_trees_all_close(out, expected, atol=1e-6)
  grads = jax.grad(lambda p: jattn.multi_head_attention(p, x).sum())(params)
  assert jnp.abs(grads['sinks']).min() > 0
  # Both wrappers hold it, take it from a pytree and give it back.
  module = jattn.nnx.MultiHeadAttention.from_params(params)
  chex.assert_trees_all_close(module(x, is_causal=True), out, atol=1e-6)
  chex.assert_trees_all_equal(module.to_params()['sinks'], params['sinks'])
  linen = jattn.linen.MultiHeadAttention(num_heads=H, num_kv_heads=2, use_sinks=True)
  variables = linen.init(jax.random.key(1), x)
  assert variables['params']['sinks'].shape == (H,)
  linen_out = linen.apply({'params': params}, x, is_causal=True)
  chex.assert_trees_all_close(linen_out, out, atol=1e-6)
  fresh = jattn.nnx.MultiHeadAttention(H, E, use_sinks=True, rngs=nnx.Rngs(0))
  assert fresh.to_params()['sinks'].shape == (H,)
  with pytest.raises(TypeError, match=r"params\['sinks'\]"):
    jattn.multi_head_attention(params, x, sinks=params['sinks'])
  with pytest.raises(ValueError, match=r"`params\['sinks'\]` must have shape"):
    jattn.multi_head_attention({**params, 'sinks': jnp.zeros(3)}, x)


def test_mods_and_block_masks_reach_the_function_and_wrappers():
  x = inputs(length=12)
  params = jattn.init_params(jax.random.key(0), E, H)
  causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
  block_mask = jattn.create_block_mask(causal, None, None, 12, 12, block_sizes=(8, 8))
  alibi = jattn.mods.alibi(jattn.mods.alibi_slopes(H))
  expected = jattn.multi_head_attention(params, x, is_causal=True, score_mod=alibi)
  for fn in (
    lambda: jattn.multi_head_attention(
      params, x, block_mask=block_mask, score_mod=alibi
    ),
    lambda: jattn.nnx.MultiHeadAttention.from_params(params)(
      x, mask_mod=causal, score_mod=alibi
    ),
    lambda: jattn.linen.MultiHeadAttention(num_heads=H).apply(
      {'params': params}, x, block_mask=block_mask, score_mod=alibi
    ),
  ):
    chex.assert_trees_all_close(fn(), expected, atol=1e-5)
  weights = jattn.multi_head_attention_weights(params, x, mask_mod=causal)
  assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0
