"""Parity with jax.nn.dot_product_attention for every argument it shares."""

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn import testing
from tests import helpers

B, T, S, H, K = 2, 6, 7, 4, 2

FEATURES = {
  'plain': {},
  'causal': {'is_causal': True},
  'mask': {'mask': helpers.random_mask(1, (B, 1, T, S))},
  'mask_per_head': {'mask': helpers.random_mask(2, (B, H, T, S))},
  'bias': {'bias': jax.random.normal(jax.random.key(3), (1, H, T, S))},
  'lengths': {
    'query_seq_lengths': jnp.array([6, 3]),
    'key_value_seq_lengths': jnp.array([7, 4]),
  },
  'window': {'local_window_size': (2, 1)},
  'scale': {'scale': 0.3},
  'mqa': {'kv_heads': 1},
  'mha': {'kv_heads': H},
  'combined': {
    'is_causal': True,
    'local_window_size': 3,
    'mask': helpers.random_mask(4, (B, 1, T, S)),
    'bias': jax.random.normal(jax.random.key(5), (B, 1, 1, S)),
    'key_value_seq_lengths': jnp.array([7, 5]),
  },
}


def jax_nn_with_zero_rows(query, key, value, bias, **kwargs):
  """jax.nn, with rows that see no key zeroed (it returns mean(V) there)."""
  weights = jattn.attention_weights(query, key, bias, **kwargs)
  has_key = jnp.swapaxes(weights.sum(-1) > 0, -1, -2)[..., None]
  mask = kwargs.pop('mask', None)
  with jax.numpy_dtype_promotion('standard'):
    out = jax.nn.dot_product_attention(query, key, value, bias, mask, **kwargs)
  return jnp.where(has_key, out, jnp.zeros((), out.dtype))


# The reference computes in float32 whatever the input: bfloat16 covers its
# half-precision path; the default (flash) path runs every dtype. Half
# precision on the features whose rounding differs (suite time).
IMPLS_AND_DTYPES = [(None, dtype) for dtype in helpers.DTYPES] + [
  ('reference', jnp.float32),
  ('reference', jnp.bfloat16),
]
HALF_PRECISION_FEATURES = ('plain', 'causal', 'combined')
CASES = [
  (feature, impl, dtype)
  for feature in sorted(FEATURES)
  for impl, dtype in IMPLS_AND_DTYPES
  if dtype == jnp.float32
  or (feature in HALF_PRECISION_FEATURES and (impl is None or feature == 'combined'))
]


@pytest.mark.parametrize(
  'feature, impl, dtype', CASES, ids=lambda x: getattr(x, '__name__', str(x))
)
def test_matches_jax_nn(feature, dtype, impl):
  kwargs = dict(FEATURES[feature])
  kv_heads = kwargs.pop('kv_heads', K)
  bias = kwargs.pop('bias', None)
  q, k, v = helpers.qkv(
    0, batch=(B,), q_len=T, kv_len=S, heads=H, kv_heads=kv_heads, dtype=dtype
  )
  bias = None if bias is None else bias.astype(dtype)
  args = (q, k, v) if bias is None else (q, k, v, bias)

  def ours(q, k, v, b=None):
    return jattn.dot_product_attention(q, k, v, b, implementation=impl, **kwargs)

  def theirs(q, k, v, b=None):
    return jax_nn_with_zero_rows(q, k, v, b, **kwargs)

  # jax.nn's float16 path does not compile inside a jit on the CPU (its
  # float16 x float16 -> float32 dot_general): that case runs op by op.
  with jax.numpy_dtype_promotion('standard'):
    testing.assert_functions_agree(
      ours,
      theirs,
      *args,
      argnums=tuple(range(len(args))),
      jit=dtype != jnp.float16,
    )


def test_default_reads_kv_head_h_over_g():
  # Query head h must read KV head h // G: permuting KV heads must change it.
  q, k, v = helpers.qkv(0, heads=4, kv_heads=2)
  out = jattn.dot_product_attention(q, k, v)
  expected = jnp.concatenate(
    [
      jattn.dot_product_attention(
        q[:, :, 2 * g : 2 * g + 2], k[:, :, g : g + 1], v[:, :, g : g + 1]
      )
      for g in range(2)
    ],
    axis=2,
  )
  testing.assert_trees_close(out, expected, jnp.float32)
