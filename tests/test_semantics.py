"""The decided semantics: causality, packing, dropout, empty rows, precision."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import testing
from tests import helpers

IMPLS = ['reference', 'xla']


def query_grad_receptive_field(fn, q, k, v):
  """[T, S] bool: does output row t depend on position s (d out_t / d v_s)?"""

  def row_to_keys(t):
    grad = jax.grad(lambda v_: fn(q, k, v_)[0, t].sum())(v)
    return jnp.abs(grad[0]).sum(axis=(-1, -2)) > 0

  return jnp.stack([row_to_keys(t) for t in range(q.shape[1])])


@pytest.mark.parametrize('impl', IMPLS)
def test_causality_by_gradient(impl):
  q, k, v = helpers.qkv(0, batch=(1,), q_len=6, kv_len=6)
  fn = lambda q, k, v: jattn.dot_product_attention(
    q, k, v, is_causal=True, implementation=impl
  )
  field = query_grad_receptive_field(fn, q, k, v)
  np.testing.assert_array_equal(field, np.tril(np.ones((6, 6), bool)))


def test_window_by_gradient():
  q, k, v = helpers.qkv(0, batch=(1,), q_len=7, kv_len=7)
  fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, local_window_size=(2, 1))
  field = query_grad_receptive_field(fn, q, k, v)
  i, j = np.indices((7, 7))
  np.testing.assert_array_equal(field, (j >= i - 2) & (j <= i + 1))


def test_packed_segments_cannot_see_each_other():
  q, k, v = helpers.qkv(0, batch=(1,), q_len=7, kv_len=7)
  seg = jnp.array([[0, 0, 0, 1, 1, 2, 2]])
  fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, q_segment_ids=seg)
  field = query_grad_receptive_field(fn, q, k, v)
  np.testing.assert_array_equal(field, seg[0][:, None] == seg[0][None, :])
  # Each segment equals attention over that segment alone.
  out = fn(q, k, v)
  alone = jattn.dot_product_attention(q[:, 3:5], k[:, 3:5], v[:, 3:5])
  testing.assert_trees_close(out[:, 3:5], alone, jnp.float32)


def test_segments_match_explicit_mask():
  q, k, v = helpers.qkv(0, q_len=5, kv_len=6)
  q_seg = jnp.array([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]])
  kv_seg = jnp.array([[0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 3, 3]])
  out = jattn.dot_product_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  mask = jattn.segment_mask(q_seg, kv_seg)
  expected = jattn.dot_product_attention(q, k, v, mask=mask)
  testing.assert_trees_close(out, expected, jnp.float32)


class TestDropout:
  q, k, v = helpers.qkv(0, q_len=32, kv_len=48)

  def run(self, rng, rate=0.25, **kwargs):
    return jattn.dot_product_attention(
      self.q, self.k, self.v, dropout_rate=rate, dropout_rng=rng, **kwargs
    )

  def test_same_key_same_result(self):
    chex.assert_trees_all_equal(
      self.run(jax.random.key(1)), self.run(jax.random.key(1))
    )

  def test_different_keys_differ(self):
    a, b = self.run(jax.random.key(1)), self.run(jax.random.key(2))
    assert float(jnp.abs(a - b).max()) > 1e-2

  def test_raw_uint32_keys_are_the_typed_key_they_hold(self):
    raw = jax.random.PRNGKey(1)
    out = self.run(raw)
    chex.assert_trees_all_equal(out, self.run(jax.random.wrap_key_data(raw)))
    assert float(jnp.abs(out - self.run(None, rate=0.0)).max()) > 1e-2

  @pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
  def test_keep_rate_and_inverted_scaling(self, rate):
    weights = jattn.attention_weights(
      self.q, self.k, dropout_rate=rate, dropout_rng=jax.random.key(3)
    )
    plain = jattn.attention_weights(self.q, self.k)
    kept = weights > 0
    keep_rate = float(kept.mean())
    n = kept.size
    assert abs(keep_rate - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(weights[kept], plain[kept] / (1 - rate), rtol=1e-5)

  def test_masks_differ_across_heads_and_batch(self):
    w = (
      jattn.attention_weights(
        self.q, self.k, dropout_rate=0.5, dropout_rng=jax.random.key(4)
      )
      > 0
    )
    assert bool((w[0, 0] != w[0, 1]).any()) and bool((w[0, 0] != w[1, 0]).any())

  def test_output_is_weights_times_value(self):
    rng = jax.random.key(5)
    out = self.run(rng)
    w = jattn.attention_weights(self.q, self.k, dropout_rate=0.25, dropout_rng=rng)
    v = jnp.repeat(self.v, 2, axis=2)
    testing.assert_trees_close(out, jnp.einsum('bhts,bshv->bthv', w, v), jnp.float32)

  @pytest.mark.parametrize(
    'kwargs',
    [
      {'rate': 0.0},
      {'deterministic': True},
      {'rng': None},
    ],
  )
  def test_deterministic_means_no_dropout(self, kwargs):
    rng = kwargs.pop('rng', jax.random.key(1))
    plain = jattn.dot_product_attention(self.q, self.k, self.v)
    chex.assert_trees_all_close(self.run(rng, **kwargs), plain)


@pytest.mark.parametrize(
  'how, impl, dtype',
  # every way, kernel and dtype; half precision in the reference by one way
  # (its float32 inside is the same for all: suite time)
  [
    (how, impl, dtype)
    for how in ('mask', 'lengths', 'window', 'segments')
    for impl in IMPLS
    for dtype in helpers.DTYPES
    if impl != 'reference' or dtype == jnp.float32 or how == 'mask'
  ],
  ids=lambda x: getattr(x, '__name__', str(x)),
)
def test_rows_with_nothing_to_attend_are_zero(dtype, impl, how):
  q, k, v = helpers.qkv(0, q_len=4, kv_len=6, dtype=dtype)
  kwargs = {
    'mask': {'mask': jnp.array([True, False, True, True])[:, None]},
    'lengths': {'key_value_seq_lengths': jnp.array([0, 6])},
    'window': {
      'local_window_size': (0, 0),
      'mask': jnp.array([True, False, True, True])[:, None],
    },
    'segments': {
      'q_segment_ids': jnp.array([[1, 9, 1, 1]] * 2),
      'kv_segment_ids': jnp.ones((2, 6), jnp.int32),
    },
  }[how]
  if impl == 'xla' and how == 'segments':
    impl = 'reference'
  fn = lambda q, k, v: jattn.dot_product_attention(
    q, k, v, implementation=impl, **kwargs
  )
  out = fn(q, k, v)
  empty = (0, slice(None)) if how == 'lengths' else (slice(None), 1)
  np.testing.assert_array_equal(np.asarray(out[empty], np.float32), 0.0)
  grads = jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
    q, k, v
  )
  chex.assert_tree_all_finite(grads)
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize('dtype', helpers.DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize('impl', IMPLS)
def test_extreme_logits_match_a_float64_oracle(dtype, impl):
  # |q.k| ~ 1e4 (1e4 for a float16 input is fine; its square is not): the
  # softmax saturates, and must still be the softmax of the exact logits.
  q, k, v = helpers.qkv(1, dtype=dtype)
  q = (q * 100).astype(dtype)
  k = (k * 100).astype(dtype)
  fn = lambda q, k, v: jattn.dot_product_attention(
    q, k, v, scale=1.0, implementation=impl
  )
  out = fn(q, k, v)
  dv = jax.grad(lambda v: fn(q, k, v).astype(jnp.float32).sum())(v)
  expected, weights = helpers.numpy_attention(q, k, v, scale=1.0)
  testing.assert_trees_close(out, expected.astype(dtype), dtype)
  # d sum(out) / dv_s = the weights every query row gives key s (over the
  # query heads sharing its KV head).
  expected_dv = (
    weights.sum(2).reshape(2, 2, 2, -1).sum(2).transpose(0, 2, 1)
  )  # [B, S, K]
  np.testing.assert_allclose(
    dv.astype(jnp.float32),
    np.repeat(expected_dv[..., None], v.shape[-1], -1),
    **testing.tolerance(dtype, grads=True),
  )


def test_half_precision_output_dtype_and_float32_logits():
  q, k, v = helpers.qkv(0, dtype=jnp.bfloat16)
  out = jattn.dot_product_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert jattn.attention_weights(q, k).dtype == jnp.float32
  exact = jattn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  testing.assert_trees_close(out, exact, jnp.bfloat16)


def test_any_number_of_batch_dims():
  q, k, v = helpers.qkv(0, batch=(2, 3))
  out = jattn.dot_product_attention(
    q, k, v, is_causal=True, query_seq_lengths=jnp.full((2, 3), 4)
  )
  flat = jattn.dot_product_attention(
    *(x.reshape((6,) + x.shape[2:]) for x in (q, k, v)),
    is_causal=True,
    query_seq_lengths=jnp.full((6,), 4),
  )
  testing.assert_trees_close(out.reshape(flat.shape), flat, jnp.float32)
  unbatched = jattn.dot_product_attention(q[0, 0], k[0, 0], v[0, 0])
  testing.assert_trees_close(
    unbatched, jattn.dot_product_attention(q, k, v)[0, 0], jnp.float32
  )


def test_value_head_dim_may_differ():
  q, k, v = helpers.qkv(0, value_dim=5)
  out = jattn.dot_product_attention(q, k, v)
  assert out.shape == q.shape[:-1] + (5,)


def test_soft_cap_bounds_logits():
  q, k, _ = helpers.qkv(0)
  capped = jattn.attention_weights(q * 10, k * 10, logits_soft_cap=2.0)
  # |logit| <= 2 -> every weight within e^-4 of its neighbours' scale.
  ratio = capped.max(-1) / capped.min(-1)
  assert float(ratio.max()) <= np.exp(4.0) * (1 + 1e-4)


def test_weights_are_normalised_and_match_output():
  q, k, v = helpers.qkv(0, kv_heads=4)
  mask = helpers.random_mask(0, (2, 1, 6, 7))
  mask = mask.at[..., 0].set(True)
  w = jattn.attention_weights(q, k, mask=mask, is_causal=True)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  allowed = jattn.combine_masks(mask, jattn.causal_mask(6, 7))
  hidden = ~jnp.broadcast_to(allowed, w.shape)
  assert not bool((w > 0)[hidden].any())
  out = jattn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  testing.assert_trees_close(out, jnp.einsum('bhts,bshv->bthv', w, v), jnp.float32)
