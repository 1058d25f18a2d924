"""Bad input -> ValueError/TypeError naming the argument (never a bare assert)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
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
    'segment ids',
  ),
  'xla with soft cap': (
    attend(implementation='xla', logits_soft_cap=5.0),
    ValueError,
    'logits_soft_cap',
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
  assert type(info.value) is not AssertionError


def test_errors_quote_the_shapes():
  with pytest.raises(ValueError, match=r'\(2, 7, 3, 8\)'):
    attend(k=jnp.ones((2, 7, 3, 8)), v=jnp.ones((2, 7, 3, 8)))()
  with pytest.raises(ValueError, match=r'\[B\.\.\., H, T, S\]'):
    attend(mask=jnp.ones((6, 5), bool))()


def test_table_is_large_enough():
  assert len(CASES) >= 30


def test_errors_raise_under_jit_at_trace_time():
  fn = jax.jit(lambda q, k: jattn.dot_product_attention(q, k, k))
  with pytest.raises(ValueError, match='key'):
    fn(Q, np.ones((2, 7, 3, 8), np.float32))
