"""Bad input -> ValueError/TypeError naming the argument (never a bare assert)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
import jattn.linen
import jattn.nnx
from tests import helpers

Q, K, V = helpers.qkv(0)  # [2, 6, 4, 8], [2, 7, 2, 8], [2, 7, 2, 8]
PARAMS = jattn.init_params(jax.random.key(0), 16, 4)
X = jnp.ones((2, 5, 16))


def attend(q=Q, k=K, v=V, bias=None, mask=None, **kwargs):
  return lambda: jattn.dot_product_attention(q, k, v, bias, mask, **kwargs)


def mha(params=PARAMS, x=X, *args, **kwargs):
  return lambda: jattn.multi_head_attention(params, x, *args, **kwargs)


def without(params, name, leaf=None):
  out = {k: dict(v) for k, v in params.items()}
  if leaf is None:
    del out[name]
  else:
    out[name][leaf] = out[name][leaf][..., :-1]
  return out


CASES = {
  'query rank 2': (attend(q=Q[0, 0]), ValueError, 'query'),
  'key rank 2': (attend(k=K[0, 0]), ValueError, 'key'),
  'value rank 2': (attend(v=V[0, 0]), ValueError, 'value'),
  'query not an array': (attend(q=[[1.0]]), TypeError, 'query'),
  'integer query': (
    attend(q=Q.astype(jnp.int32), k=K.astype(jnp.int32), v=V.astype(jnp.int32)),
    TypeError,
    'query',
  ),
  'batch mismatch': (attend(k=K[:1], v=V[:1]), ValueError, 'key'),
  'head dim mismatch': (attend(k=K[..., :4]), ValueError, 'key'),
  'key/value length mismatch': (attend(v=V[:, :5]), ValueError, 'value'),
  'key/value heads mismatch': (attend(v=V[:, :, :1]), ValueError, 'value'),
  'H not divisible by K': (
    attend(k=jnp.ones((2, 7, 3, 8)), v=jnp.ones((2, 7, 3, 8))),
    ValueError,
    'multiple',
  ),
  'key rank differs': (attend(k=K[None], v=V[None]), ValueError, 'key'),
  'mixed dtypes': (attend(k=K.astype(jnp.bfloat16)), TypeError, 'key'),
  'mask not broadcastable': (attend(mask=jnp.ones((6, 5), bool)), ValueError, 'mask'),
  'mask rank too high': (
    attend(mask=jnp.ones((1, 2, 4, 6, 7), bool)),
    ValueError,
    'mask',
  ),
  'mask heads wrong': (attend(mask=jnp.ones((2, 3, 6, 7), bool)), ValueError, 'mask'),
  'non-bool mask': (attend(mask=jnp.ones((6, 7))), TypeError, 'mask'),
  'bias not broadcastable': (attend(bias=jnp.ones((2, 4, 7, 6))), ValueError, 'bias'),
  'integer bias': (attend(bias=jnp.ones((6, 7), jnp.int32)), TypeError, 'bias'),
  'query lengths wrong shape': (
    attend(query_seq_lengths=jnp.array([1, 2, 3])),
    ValueError,
    'query_seq_lengths',
  ),
  'float lengths': (
    attend(key_value_seq_lengths=jnp.array([1.0, 2.0])),
    TypeError,
    'key_value_seq_lengths',
  ),
  'segment ids wrong length': (
    attend(q_segment_ids=jnp.zeros((2, 5), int), kv_segment_ids=jnp.zeros((2, 7), int)),
    ValueError,
    'q_segment_ids',
  ),
  'kv segments needed when T != S': (
    attend(q_segment_ids=jnp.zeros((2, 6), int)),
    ValueError,
    'kv_segment_ids',
  ),
  'kv segments without q': (
    attend(kv_segment_ids=jnp.zeros((2, 7), int)),
    ValueError,
    'kv_segment_ids',
  ),
  'negative window': (attend(local_window_size=-1), ValueError, 'local_window_size'),
  'window triple': (
    attend(local_window_size=(1, 2, 3)),
    TypeError,
    'local_window_size',
  ),
  'dropout rate 1': (attend(dropout_rate=1.0), ValueError, 'dropout_rate'),
  'negative dropout rate': (attend(dropout_rate=-0.1), ValueError, 'dropout_rate'),
  'dropout without key': (
    attend(dropout_rate=0.1, deterministic=False),
    ValueError,
    'dropout_rng',
  ),
  'dropout key not a key': (
    attend(dropout_rate=0.1, dropout_rng=jnp.ones(3)),
    TypeError,
    'dropout_rng',
  ),
  'soft cap zero': (attend(logits_soft_cap=0.0), ValueError, 'logits_soft_cap'),
  'scale a string': (attend(scale='big'), TypeError, 'scale'),
  'is_causal not bool': (attend(is_causal='yes'), TypeError, 'is_causal'),
  'unknown implementation': (
    attend(implementation='fast'),
    ValueError,
    'implementation',
  ),
  'xla with segments': (
    attend(
      implementation='xla',
      q_segment_ids=jnp.zeros((2, 6), int),
      kv_segment_ids=jnp.zeros((2, 7), int),
    ),
    ValueError,
    'q_segment_ids; kv_segment_ids',
  ),
  'xla with soft cap': (
    attend(implementation='xla', logits_soft_cap=5.0),
    ValueError,
    'logits_soft_cap',
  ),
  'weights with an unknown option': (
    lambda: jattn.attention_weights(Q, K, is_casual=True),
    TypeError,
    'is_casual',
  ),
  'chunk size zero': (
    attend(attention_chunk_size=0),
    ValueError,
    'attention_chunk_size',
  ),
  'prefix without causal': (
    attend(prefix_lengths=jnp.array([1, 2])),
    ValueError,
    'prefix_lengths',
  ),
  'ring with a dense mask': (
    lambda: jattn.sharding.ring_attention(
      Q, K, V, mask=jnp.ones((6, 7), bool), mesh=jattn.sharding.make_mesh({'seq': 8})
    ),
    ValueError,
    'dense `mask`',
  ),
  'weights with bad mask': (
    lambda: jattn.attention_weights(Q, K, mask=jnp.ones((3, 7), bool)),
    ValueError,
    'mask',
  ),
  'params missing a projection': (
    mha(params=without(PARAMS, 'out')),
    ValueError,
    'params',
  ),
  'params not a dict': (mha(params=[1, 2]), ValueError, 'params'),
  'params bias wrong shape': (
    mha(params=without(PARAMS, 'query', 'bias')),
    ValueError,
    "params['query']['bias']",
  ),
  'params key kernel heads': (
    mha(params={**PARAMS, 'key': {'kernel': jnp.ones((16, 3, 4))}}),
    ValueError,
    "params['key']['kernel']",
  ),
  'inputs features mismatch': (mha(x=jnp.ones((2, 5, 8))), ValueError, 'inputs_q'),
  'inputs_v without inputs_k': (mha(inputs_v=X), ValueError, 'inputs_v'),
  'integer inputs': (mha(x=jnp.ones((2, 5, 16), jnp.int32)), TypeError, 'inputs_q'),
  'mha mask not broadcastable': (
    mha(mask=jnp.ones((2, 4, 5, 4), bool)),
    ValueError,
    'mask',
  ),
  'init heads do not divide': (
    lambda: jattn.init_params(jax.random.key(0), 10, 4),
    ValueError,
    'num_heads',
  ),
  'init kv heads do not divide': (
    lambda: jattn.init_params(jax.random.key(0), 16, 4, num_kv_heads=3),
    ValueError,
    'num_kv_heads',
  ),
  # Zero sizes that cannot work; zero B, T or S return the empty result.
  'head dim zero': (
    attend(q=jnp.ones((2, 6, 4, 0)), k=jnp.ones((2, 7, 2, 0)), v=V),
    ValueError,
    'D dim',
  ),
  'query heads zero': (attend(q=jnp.ones((2, 6, 0, 8))), ValueError, 'H dim'),
  'kv heads zero': (
    attend(k=jnp.ones((2, 7, 0, 8)), v=jnp.ones((2, 7, 0, 8))),
    ValueError,
    'K dim',
  ),
  'value dim zero': (attend(v=jnp.ones((2, 7, 2, 0))), ValueError, 'V dim'),
  # Options of the wrong kind or value.
  'block sizes an int': (attend(block_sizes=8), ValueError, 'block_sizes'),
  'block sizes one long': (attend(block_sizes=(8,)), ValueError, 'block_sizes'),
  'block sizes zero': (attend(block_sizes=(8, 0)), ValueError, 'block_sizes'),
  'window a float': (attend(local_window_size=2.5), TypeError, 'local_window_size'),
  'window a bool': (attend(local_window_size=True), TypeError, 'local_window_size'),
  'window a dict': (attend(local_window_size={}), TypeError, 'local_window_size'),
  'deterministic a string': (
    attend(deterministic='yes'),
    TypeError,
    'deterministic',
  ),
  'scale nan': (attend(scale=float('nan')), ValueError, 'scale'),
  'scale inf': (attend(scale=float('inf')), ValueError, 'scale'),
  'scale zero': (attend(scale=0.0), ValueError, 'scale'),
  'scale an array': (attend(scale=jnp.ones(2)), TypeError, 'scale'),
  'soft cap inf': (attend(logits_soft_cap=float('inf')), ValueError, 'logits_soft_cap'),
  'dropout rate a bool': (attend(dropout_rate=True), TypeError, 'dropout_rate'),
  'return_residual a string': (
    attend(return_residual='yes'),
    TypeError,
    'return_residual',
  ),
  'cudnn without a GPU': (attend(implementation='cudnn'), ValueError, "'cpu' backend"),
  # The multi-head function and the wrappers.
  'num_heads a bool': (
    lambda: jattn.init_params(jax.random.key(0), 16, True),
    TypeError,
    'num_heads',
  ),
  'head_dim zero': (
    lambda: jattn.init_params(jax.random.key(0), 16, 4, head_dim=0),
    ValueError,
    'head_dim',
  ),
  'integer kernels': (
    mha(params=jax.tree.map(lambda x: x.astype(jnp.int32), PARAMS)),
    TypeError,
    'must have a floating dtype',
  ),
  'integer dtype': (mha(dtype=jnp.int32), TypeError, 'dtype'),
  'dtype not a dtype': (mha(dtype='banana'), TypeError, 'dtype'),
  'None bias leaf': (
    mha(params={**PARAMS, 'query': {**PARAMS['query'], 'bias': None}}),
    TypeError,
    "params['query']['bias']",
  ),
  'unknown leaf': (
    mha(params={**PARAMS, 'out': {**PARAMS['out'], 'scale': PARAMS['out']['bias']}}),
    ValueError,
    "params['out']",
  ),
  'nnx dropout rate': (
    lambda: jattn.nnx.MultiHeadAttention(4, 16, dropout_rate=1.5, rngs=nnx.Rngs(0)),
    ValueError,
    'dropout_rate',
  ),
  'nnx implementation': (
    lambda: jattn.nnx.MultiHeadAttention(
      4, 16, implementation='fast', rngs=nnx.Rngs(0)
    ),
    ValueError,
    'implementation',
  ),
  'nnx rngs None': (
    lambda: jattn.nnx.MultiHeadAttention(4, 16, rngs=None),
    TypeError,
    'rngs',
  ),
  'nnx rngs an int': (
    lambda: jattn.nnx.MultiHeadAttention(4, 16, rngs=3),
    TypeError,
    'rngs',
  ),
  'nnx dropout without a stream': (
    lambda: jattn.nnx.MultiHeadAttention(
      4, 16, dropout_rate=0.1, rngs=nnx.Rngs(params=0)
    ),
    ValueError,
    'dropout',
  ),
  'linen dropout rate': (
    lambda: jattn.linen.MultiHeadAttention(num_heads=4, dropout_rate=-0.5),
    ValueError,
    'dropout_rate',
  ),
  'linen implementation': (
    lambda: jattn.linen.MultiHeadAttention(num_heads=4, implementation='fast'),
    ValueError,
    'implementation',
  ),
  # The mask helpers.
  'padding negative lengths': (
    lambda: jattn.padding_mask(jnp.array([-1, 2]), None, 3, 3),
    ValueError,
    'query_lengths',
  ),
  'padding float lengths': (
    lambda: jattn.padding_mask(None, jnp.array([1.5, 2.0]), 3, 3),
    TypeError,
    'key_value_lengths',
  ),
  'padding lengths do not broadcast': (
    lambda: jattn.padding_mask(jnp.array([1, 2]), jnp.array([1, 2, 3]), 3, 3),
    ValueError,
    'key_value_lengths',
  ),
  'segment float ids': (
    lambda: jattn.segment_mask(jnp.ones((2, 3))),
    TypeError,
    'q_segment_ids',
  ),
  'segment batch mismatch': (
    lambda: jattn.segment_mask(jnp.ones((2, 3), int), jnp.ones((3, 4), int)),
    ValueError,
    'kv_segment_ids',
  ),
  'combine float mask': (
    lambda: jattn.combine_masks(jnp.ones((3, 3)), jnp.ones((3, 3), bool)),
    TypeError,
    'masks[0]',
  ),
  'combine shapes do not broadcast': (
    lambda: jattn.combine_masks(jnp.ones((3, 4), bool), jnp.ones((2, 3), bool)),
    ValueError,
    'masks[1]',
  ),
  'causal negative length': (lambda: jattn.causal_mask(-1, 3), ValueError, 'q_len'),
  'causal float length': (lambda: jattn.causal_mask(3, 2.5), TypeError, 'kv_len'),
  'window mask float': (
    lambda: jattn.local_window_mask(3, 3, 1.5),
    TypeError,
    'local_window_size',
  ),
  'init_params with an int for a key': (
    lambda: jattn.init_params(123, 16, 4),
    TypeError,
    '`rng`',
  ),
  'integer param_dtype': (
    lambda: jattn.init_params(jax.random.key(0), 16, 4, param_dtype=jnp.int32),
    TypeError,
    '`param_dtype`',
  ),
  'param_dtype not a dtype': (
    lambda: jattn.param_shapes(16, 4, param_dtype='float-ish'),
    TypeError,
    '`param_dtype`',
  ),
  'ring with S = 0 and a bad option': (
    lambda: jattn.sharding.ring_attention(
      Q, K[:, :0], V[:, :0], mesh=jattn.sharding.make_mesh({'seq': 8}), scale=0.0
    ),
    ValueError,
    '`scale`',
  ),
  'nnx key features mismatch': (
    lambda: jattn.nnx.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))(
      X, jnp.ones((2, 5, 8))
    ),
    ValueError,
    'inputs_k',
  ),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_is_reported(case):
  fn, error, name = CASES[case]
  with pytest.raises(error) as info:
    fn()
  assert name in str(info.value), str(info.value)
  # Raised by jattn's own checks, not leaked from JAX, chex or Flax internals.
  raised_in = str(info.traceback[-1].path)
  assert f'{os.sep}jattn{os.sep}' in raised_in, raised_in


def test_errors_quote_the_shapes():
  with pytest.raises(ValueError, match=r'\(2, 7, 3, 8\)'):
    attend(k=jnp.ones((2, 7, 3, 8)), v=jnp.ones((2, 7, 3, 8)))()
  with pytest.raises(ValueError, match=r'\[B\.\.\., H, T, S\]'):
    attend(mask=jnp.ones((6, 5), bool))()


# Values (not shapes) of traced arrays cannot be checked at trace time.
VALUE_CHECKS = {'padding negative lengths'}


@pytest.mark.parametrize('case', sorted(set(CASES) - VALUE_CHECKS))
def test_bad_input_is_reported_under_jit(case):
  # Checks run at trace time, so jit raises the same error before computing.
  fn, error, name = CASES[case]
  with pytest.raises(error) as info:
    jax.jit(fn)()
  assert name in str(info.value), str(info.value)


@pytest.mark.parametrize(
  'options',
  [
    dict(local_window_size=np.int64(2)),
    dict(local_window_size=(np.int32(1), 2)),
    dict(logits_soft_cap=np.float32(30)),
    dict(dropout_rate=np.float32(0.1), dropout_rng=jax.random.key(0)),
    dict(scale=jnp.float32(0.5)),
    dict(scale=np.array(0.5)),
    dict(is_causal=np.bool_(True)),
    dict(block_sizes=[np.int64(8), 8]),
  ],
  ids=lambda o: ', '.join(f'{k}={type(v).__name__}' for k, v in o.items()),
)
def test_numpy_scalars_are_numbers(options):
  python = {
    k: (v if k == 'dropout_rng' else jax.tree.map(lambda x: np.asarray(x).item(), v))
    for k, v in options.items()
  }
  expected = jattn.dot_product_attention(Q, K, V, **python)
  np.testing.assert_array_equal(
    jattn.dot_product_attention(Q, K, V, **options), expected
  )


def test_a_traced_option_says_it_must_be_static():
  with pytest.raises(TypeError, match=r'scale.*concrete'):
    jax.jit(lambda s: jattn.dot_product_attention(Q, K, V, scale=s))(0.5)


@pytest.mark.parametrize('implementation', [None, 'flash', 'reference', 'xla'])
@pytest.mark.parametrize(
  'shapes',
  [((2, 0, 4), (2, 7, 2)), ((2, 6, 4), (2, 0, 2)), ((0, 6, 4), (0, 7, 2))],
  ids=['T=0', 'S=0', 'B=0'],
)
def test_zero_sizes_give_the_empty_result(shapes, implementation):
  (b, t, h), (_, s, k) = shapes
  q, kv = jnp.ones((b, t, h, 8)), jnp.ones((b, s, k, 8))
  f = lambda q, kv: jattn.dot_product_attention(
    q, kv, kv, implementation=implementation, is_causal=t == s
  )
  out = f(q, kv)
  assert out.shape == (b, t, h, 8)
  np.testing.assert_array_equal(out, 0.0)  # S = 0: rows see no key
  dq, dkv = jax.grad(lambda q, kv: f(q, kv).sum(), argnums=(0, 1))(q, kv)
  assert dq.shape == q.shape and dkv.shape == kv.shape
  if t and b:
    ref = jax.nn.dot_product_attention(q, kv, kv)
    assert ref.shape == out.shape
  weights = jattn.attention_weights(q, kv)
  assert weights.shape == (b, h, t, s)


def test_errors_raise_under_jit_at_trace_time():
  fn = jax.jit(lambda q, k: jattn.dot_product_attention(q, k, k))
  with pytest.raises(ValueError, match='key'):
    fn(Q, np.ones((2, 7, 3, 8), np.float32))
