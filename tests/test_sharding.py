"""Sharded multi-head attention and ring attention on 8 virtual CPU devices."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn
import jattn.linen
import jattn.nnx
from jattn import sharding, testing
from tests import helpers

E, H = 32, 8


def test_make_mesh_shapes_and_errors():
  mesh = sharding.make_mesh({'data': 2, 'model': -1})
  assert dict(mesh.shape) == {'data': 2, 'model': 4}
  assert sharding.make_mesh((2, 2, 2)).axis_names == ('data', 'model', 'seq')
  with pytest.raises(ValueError, match='needs 6 devices'):
    sharding.make_mesh({'data': 3, 'model': 2})
  with pytest.raises(ValueError, match='does not divide'):
    sharding.make_mesh({'data': 3, 'model': -1})
  with pytest.raises(ValueError, match='among'):
    sharding.make_mesh({'batch': 8})


def test_param_specs_split_heads():
  mesh = sharding.make_mesh({'data': 2, 'model': 4})
  specs = sharding.param_specs(jattn.init_params(jax.random.key(0), E, H), mesh)
  assert specs['query']['kernel'] == P(None, 'model', None)
  assert specs['out']['kernel'] == P('model', None, None)
  assert specs['out']['bias'] == P(None)
  gqa = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=2)
  specs = sharding.param_specs(gqa, mesh)  # K=2 does not split over 4
  assert specs['key']['kernel'] == P(None, None, None)
  assert specs['query']['kernel'] == P(None, 'model', None)
  with_sinks = jattn.init_params(jax.random.key(0), E, H, use_sinks=True)
  assert sharding.param_specs(with_sinks, mesh)['sinks'] == P('model')


def test_linear_specs_megatron_pair():
  mesh = sharding.make_mesh({'data': 2, 'model': 4})
  layer = lambda e, f: {'kernel': jnp.zeros((e, f)), 'bias': jnp.zeros((f,))}
  assert sharding.linear_specs(layer(16, 64), mesh, split='outputs') == {
    'kernel': P(None, 'model'),
    'bias': P('model'),
  }
  assert sharding.linear_specs(layer(64, 16), mesh, split='inputs') == {
    'kernel': P('model', None),
    'bias': P(None),
  }
  unsplit = sharding.linear_specs(layer(16, 6), mesh, split='outputs')
  assert unsplit == {'kernel': P(None, None), 'bias': P(None)}  # 4 does not divide 6
  no_bias = sharding.linear_specs({'kernel': jnp.zeros((8, 8))}, mesh, split='inputs')
  assert set(no_bias) == {'kernel'}
  with pytest.raises(ValueError, match='split'):
    sharding.linear_specs(layer(8, 8), mesh, split='rows')


MESHES = [
  {'data': 8},
  {'data': 2, 'model': 4},
  {'data': 4, 'model': 2},
  {'data': 2, 'model': 2, 'seq': 2},
]


@pytest.mark.parametrize(
  'mesh_shape, dtype',
  # every mesh in float32, one in bfloat16 (suite time)
  [(mesh, jnp.float32) for mesh in MESHES] + [(MESHES[-1], jnp.bfloat16)],
  ids=str,
)
def test_multi_head_sharded_matches_single_device(mesh_shape, dtype):
  mesh = sharding.make_mesh(mesh_shape)
  params = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=4)
  x = jax.random.normal(jax.random.key(1), (8, 16, E), dtype)
  fn = lambda p, x: jattn.multi_head_attention(p, x, is_causal=True)
  loss = lambda p, x: fn(p, x).astype(jnp.float32).sum()
  expected = fn(params, x), jax.grad(loss, argnums=(0, 1))(params, x)
  sharded_params = sharding.shard_params(params, mesh)
  sharded_x = sharding.shard_batch(x, mesh)
  out = jax.jit(fn)(sharded_params, sharded_x)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(sharded_params, sharded_x)
  testing.assert_trees_close(out, expected[0], dtype)
  testing.assert_trees_close(grads, expected[1], dtype, grads=True)


def test_heads_stay_sharded():
  mesh = sharding.make_mesh({'data': 2, 'model': 4})
  params = sharding.shard_params(jattn.init_params(jax.random.key(0), E, H), mesh)
  x = sharding.shard_batch(jnp.ones((4, 16, E)), mesh)
  hlo = jax.jit(jattn.multi_head_attention).lower(params, x).compile().as_text()
  assert 'all-gather' not in hlo  # Q, K, V are never gathered over heads
  assert 'all-reduce' in hlo or 'reduce-scatter' in hlo  # the out projection


def test_wrappers_sharded():
  mesh = sharding.make_mesh({'data': 2, 'model': 4})
  x = jax.random.normal(jax.random.key(1), (4, 16, E))
  linen_module = jattn.linen.MultiHeadAttention(num_heads=H)
  params = linen_module.init(jax.random.key(0), x)['params']
  expected = linen_module.apply({'params': params}, x)
  sharded = sharding.shard_params(params, mesh)
  out = jax.jit(lambda p, x: linen_module.apply({'params': p}, x))(
    sharded, sharding.shard_batch(x, mesh)
  )
  testing.assert_trees_close(out, expected, jnp.float32)
  module = jattn.nnx.MultiHeadAttention.from_params(params)
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, sharding.shard_params(params, mesh))
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  testing.assert_trees_close(out, expected, jnp.float32)
  flax_out = nn.MultiHeadDotProductAttention(num_heads=H).apply({'params': params}, x)
  testing.assert_trees_close(out, flax_out, jnp.float32)


RING_MESHES = [
  {'seq': 8},
  {'data': 2, 'seq': 4},
  {'model': 2, 'seq': 4},
  {'data': 2, 'model': 2, 'seq': 2},
]


def ring_check(mesh_shape, *, q_len=48, dtype=jnp.float32, kv_heads=2, **kwargs):
  mesh = sharding.make_mesh(mesh_shape)
  q, k, v = helpers.qkv(
    0, batch=(2,), q_len=q_len, kv_len=q_len, heads=4, kv_heads=kv_heads, dtype=dtype
  )
  ring = lambda q, k, v: sharding.ring_attention(
    q, k, v, mesh=mesh, block_sizes=(8, 8), **kwargs
  )
  reference = lambda q, k, v: jattn.dot_product_attention(
    q, k, v, implementation='reference', **kwargs
  )
  spec = NamedSharding(mesh, sharding.activation_spec(mesh))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
  testing.assert_functions_agree(jax.jit(ring), reference, q, k, v)


@pytest.mark.parametrize(
  'mesh_shape, causal',
  # each mesh once, each direction twice (suite time)
  [(mesh, index in (0, 3)) for index, mesh in enumerate(RING_MESHES)],
  ids=str,
)
def test_ring_matches_reference(mesh_shape, causal):
  ring_check(mesh_shape, is_causal=causal)


@pytest.mark.parametrize('causal', [False, True])
def test_ring_odd_lengths_padding_segments_gqa(causal):
  # 8 devices x 7 rows: odd per-device lengths (padded inside for zig-zag).
  segments = jnp.repeat(jnp.arange(4)[None], 2, 0).repeat(14, 1)
  ring_check(
    {'seq': 8},
    q_len=56,
    kv_heads=1,
    is_causal=causal,
    key_value_seq_lengths=jnp.array([56, 30]),
    query_seq_lengths=jnp.array([50, 56]),
    q_segment_ids=segments,
  )


def test_ring_bfloat16_window_and_dropout():
  ring_check(  # one compilation for all four (suite time)
    {'data': 2, 'seq': 4},
    dtype=jnp.bfloat16,
    local_window_size=(5, 3),
    logits_soft_cap=3.0,
    dropout_rate=0.2,
    dropout_rng=jax.random.key(3),
  )


def test_ring_rejects_dense_masks_and_missing_axis():
  q, k, v = helpers.qkv(0, q_len=16, kv_len=16)
  with pytest.raises(ValueError, match="without the sequence axis 'seq'"):
    sharding.ring_attention(q, k, v, mesh=sharding.make_mesh({'data': 8}))
  mesh = sharding.make_mesh({'seq': 8})
  with pytest.raises(ValueError, match=r'dense `mask` or `bias`'):
    sharding.ring_attention(q, k, v, mask=jnp.ones((16, 16), bool), mesh=mesh)
  with pytest.raises(ValueError, match=r'dense `mask` or `bias`'):
    sharding.ring_attention(q, k, v, jnp.zeros((16, 16)), mesh=mesh)
  with pytest.raises(ValueError, match='T=16 != S=7'):
    sharding.ring_attention(q, k[:, :7], v[:, :7], is_causal=True, mesh=mesh)
  with pytest.raises(ValueError, match="None or 'flash'"):
    sharding.ring_attention(q, k, v, mesh=mesh, implementation='reference')


def test_ring_residual_zero_sizes_and_one_compilation():
  mesh = sharding.make_mesh({'seq': 8})
  q, k, v = helpers.qkv(0, q_len=16, kv_len=16)
  out, lse = sharding.ring_attention(
    q, k, v, mesh=mesh, is_causal=True, return_residual=True
  )
  expected = jattn.dot_product_attention(
    q, k, v, is_causal=True, return_residual=True, implementation='reference'
  )
  testing.assert_trees_close((out, lse), expected, jnp.float32)
  # S = 0: zero rows and -inf log-sum-exp, as dot_product_attention gives.
  empty = sharding.ring_attention(
    q, k[:, :0], v[:, :0], mesh=mesh, return_residual=True
  )
  chex.assert_trees_all_equal(
    empty, jattn.dot_product_attention(q, k[:, :0], v[:, :0], return_residual=True)
  )
  assert sharding.ring_attention(q[:0], k[:0], v[:0], mesh=mesh).shape == (0, 16, 4, 8)
  # jit-compiled once per shape: a second call with new values compiles nothing.
  again = lambda q: sharding.ring_attention(
    q, k, v, mesh=mesh, is_causal=True, return_residual=True
  )
  assert helpers.compilations(again, q + 1) == 0


def test_ring_memory_per_device_falls_as_one_over_devices():
  # Forward+backward, causal (zig-zag), at T = S = 4096 in blocks of 128:
  # each doubling of the ring halves the compiled per-device temporaries, up
  # to the blocks every device keeps (measured 0.51 and 0.54 per doubling on
  # 2, 4, 8 devices; two compilations here, at 2 and 8).
  t, causal = 4096, True
  spec = jax.ShapeDtypeStruct((1, t, 8, 64), jnp.float32)

  def per_device(n):
    mesh = sharding.make_mesh({'seq': n}, devices=jax.devices()[:n])
    arg = jax.ShapeDtypeStruct(
      spec.shape, spec.dtype, sharding=NamedSharding(mesh, P(None, 'seq'))
    )
    fn = lambda q, k, v: sharding.ring_attention(
      q, k, v, mesh=mesh, is_causal=causal, block_sizes=(128, 128)
    )
    return testing.temp_bytes(testing.compiled_gradient(fn, arg, arg, arg))

  two, eight = per_device(2), per_device(8)
  assert eight <= 0.65**2 * two, (two, eight)


def test_pmap_step_equals_jit_step():
  params = jattn.init_params(jax.random.key(0), E, H)
  x = jax.random.normal(jax.random.key(1), (8, 4, 16, E))  # [devices, B, T, E]

  def loss(p, x):
    return jnp.mean(jnp.square(jattn.multi_head_attention(p, x, is_causal=True)))

  def pmap_step(p, x):
    grads = jax.lax.pmean(jax.grad(loss)(p, x), 'data')
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads)

  replicated = jax.tree.map(lambda w: jnp.broadcast_to(w, (8, *w.shape)), params)
  pmapped = jax.pmap(pmap_step, axis_name='data')(replicated, x)
  mesh = sharding.make_mesh({'data': 8})
  flat = sharding.shard_batch(x.reshape(32, 16, E), mesh)

  @jax.jit
  def jit_step(p, x):
    # The mean over devices of per-device means == the mean over the batch.
    grads = jax.grad(
      lambda p: jnp.mean(jnp.square(jattn.multi_head_attention(p, x, is_causal=True)))
    )(p)
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, grads)

  stepped = jit_step(params, flat)
  testing.assert_trees_close(
    jax.tree.map(lambda w: w[0], pmapped), stepped, jnp.float32
  )
  for leaf in jax.tree.leaves(pmapped):
    np.testing.assert_allclose(leaf[0], leaf[-1], rtol=1e-6, atol=1e-7)
