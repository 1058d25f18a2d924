"""Flash attention against the reference: every feature, values and gradients."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _flash, _prepare, testing
from tests import helpers

B, T, S, H = 2, 37, 45, 4  # odd lengths: not multiples of any block size
BLOCKS = (8, 16)

FEATURES = {
  'plain': {},
  'causal': {'is_causal': True},
  'window': {'local_window_size': (5, 3)},
  'causal_window': {'is_causal': True, 'local_window_size': (9, 0)},
  'lengths': {
    'query_seq_lengths': jnp.array([37, 20]),
    'key_value_seq_lengths': jnp.array([40, 3]),
  },
  'segments': {
    'q_segment_ids': jnp.repeat(jnp.arange(4)[None], 2, 0).repeat(10, 1)[:, :T],
    'kv_segment_ids': jnp.repeat(jnp.arange(5)[None], 2, 0).repeat(9, 1)[:, :S],
  },
  'soft_cap': {'logits_soft_cap': 2.0},
  'dropout': {'dropout_rate': 0.3, 'dropout_rng': jax.random.key(7)},
  'mask': {'mask': helpers.random_mask(1, (B, 1, T, S))},
  'mask_per_head': {'mask': helpers.random_mask(2, (B, H, T, S))},
  'key_mask': {'mask': helpers.random_mask(3, (B, 1, 1, S))},
  'bias': {'bias': (1, H, T, S)},
  'bias_per_batch_key': {'bias': (B, 1, 1, S)},
  'everything': {
    'is_causal': True,
    'local_window_size': 12,
    'key_value_seq_lengths': jnp.array([45, 30]),
    'logits_soft_cap': 5.0,
    'dropout_rate': 0.2,
    'dropout_rng': jax.random.key(8),
    'mask': helpers.random_mask(4, (B, 1, T, S)),
    'bias': (B, H, T, S),
  },
}


def check(kwargs, *, dtype=jnp.float32, kv_heads=2, blocks=BLOCKS, **shape):
  kwargs = dict(kwargs)
  bias_shape = kwargs.pop('bias', None)
  mask = kwargs.pop('mask', None)
  shape = {'batch': (B,), 'q_len': T, 'kv_len': S, 'heads': H, **shape}
  q, k, v = helpers.qkv(0, kv_heads=kv_heads, dtype=dtype, **shape)
  bias = None
  if bias_shape is not None:
    bias = jax.random.normal(jax.random.key(5), bias_shape, dtype)
  testing.assert_implementations_agree(
    q,
    k,
    v,
    bias,
    mask,
    implementations=('reference', 'flash'),
    block_sizes=blocks,
    **kwargs,
  )


@pytest.mark.parametrize('feature', sorted(FEATURES))
def test_feature_matches_reference(feature):
  check(FEATURES[feature])


@pytest.mark.parametrize(
  'kv_heads, dtype',
  # (2, float32) is test_feature_matches_reference[everything]
  [(2, jnp.bfloat16), (2, jnp.float16), (4, jnp.float32), (1, jnp.bfloat16)],
  ids=lambda x: getattr(x, '__name__', str(x)),
)
def test_dtypes_and_head_groups(dtype, kv_heads):
  check(FEATURES['everything'], dtype=dtype, kv_heads=kv_heads)


@pytest.mark.parametrize('blocks', [(8, 8), (16, 8), (64, 64), None])
def test_block_sizes(blocks):
  check(FEATURES['causal'], blocks=blocks)


def test_more_queries_than_keys_and_value_dim():
  check({'is_causal': True, 'local_window_size': (3, 2)}, q_len=29, kv_len=11)
  q, k, v = helpers.qkv(0, value_dim=5)
  testing.assert_implementations_agree(
    q, k, v, implementations=('reference', 'flash'), block_sizes=(8, 8)
  )


def test_default_implementation_is_flash_on_cpu():
  # The automatic choice compiles to the very program flash does (and not
  # to the reference's).
  q, k, v = helpers.qkv(0)

  def program(implementation):
    fn = lambda q, k, v: jattn.dot_product_attention(
      q, k, v, implementation=implementation
    )
    return jax.jit(fn).lower(q, k, v).as_text()

  assert program(None) == program('flash') != program('reference')


@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(
  q_len=st.integers(1, 40),
  kv_len=st.integers(1, 40),
  kv_heads=st.sampled_from([1, 2]),
  block_q=st.sampled_from([8, 16, 32]),
  block_k=st.sampled_from([8, 16, 32]),
  causal=st.booleans(),
  window=st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
  mask_seed=st.one_of(st.none(), st.integers(0, 100)),
)
def test_property_random_shapes(
  q_len, kv_len, kv_heads, block_q, block_k, causal, window, mask_seed
):
  q, k, v = helpers.qkv(
    1, batch=(1,), q_len=q_len, kv_len=kv_len, heads=2, kv_heads=kv_heads
  )
  mask = None
  if mask_seed is not None:
    mask = helpers.random_mask(mask_seed, (1, 1, q_len, kv_len), p=0.6)
  testing.assert_implementations_agree(
    q,
    k,
    v,
    None,
    mask,
    implementations=('reference', 'flash'),
    block_sizes=(block_q, block_k),
    is_causal=causal,
    local_window_size=window,
  )


@pytest.mark.parametrize('dtype', helpers.DTYPES, ids=lambda d: d.__name__)
def test_empty_rows_and_extreme_logits(dtype):
  # Row 3 sees no key; the others saturate (|q.k| ~ 1e4) across 3 x 3 blocks.
  q, k, v = helpers.qkv(0, q_len=20, kv_len=24, dtype=dtype)
  q, k = (q * 100).astype(dtype), (k * 100).astype(dtype)
  mask = jnp.ones((20, 1), bool).at[3].set(False)

  def attend(impl):
    return lambda q, k, v: jattn.dot_product_attention(
      q, k, v, mask=mask, scale=1.0, implementation=impl, block_sizes=(8, 8)
    )

  out = attend('flash')(q, k, v)
  expected, _ = helpers.numpy_attention(q, k, v, scale=1.0)
  expected[:, 3] = 0.0
  testing.assert_trees_close(out, expected.astype(dtype), dtype)

  # Gradients equal the reference kernel's. A saturated softmax's dq and dk
  # are rounding noise times |q|, |k| ~ 100: they are compared at that scale.
  def grads(impl):
    loss = lambda *a: attend(impl)(*a).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  (dq, dk, dv), (dq_ref, dk_ref, dv_ref) = grads('flash'), grads('reference')
  testing.assert_trees_close(dv, dv_ref, dtype, grads=True)
  testing.assert_trees_close(
    (dq / 100, dk / 100), (dq_ref / 100, dk_ref / 100), dtype, grads=True
  )
  np.testing.assert_array_equal(dq[:, 3], 0.0)  # the empty row's


def flash_grad_temp_bytes(t, **kwargs):
  spec = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
  fn = lambda q, k, v: jattn.dot_product_attention(q, k, v, **kwargs)
  return testing.temp_bytes(testing.compiled_gradient(fn, spec, spec, spec))


def test_temp_memory_grows_linearly():
  small, large = flash_grad_temp_bytes(4096), flash_grad_temp_bytes(8192)
  assert large <= 2.2 * small, (small, large)


def test_no_t_by_s_buffer():
  # Forward + backward at T = S = 4096: a [T, S] float32 buffer is 64 MiB.
  t = 4096
  q, k, v = helpers.qkv(
    0, batch=(1,), q_len=t, kv_len=t, heads=2, kv_heads=2, head_dim=32
  )

  def temp_bytes(impl):
    fn = lambda q, k, v: jattn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl
    )
    return testing.temp_bytes(testing.compiled_gradient(fn, q, k, v))

  assert temp_bytes('flash') < t * t * 4 / 4


ROW_LAYOUTS = {
  'is_causal': True,
  'q_segment_ids': jnp.array(np.sort(np.random.default_rng(0).integers(0, 4, (B, T)))),
  'kv_segment_ids': jnp.array(np.sort(np.random.default_rng(1).integers(0, 4, (B, S)))),
  'q_offsets': jnp.array([8, 0]),
  'key_value_seq_lengths': jnp.array([45, 21]),
}


@pytest.mark.parametrize('in_turn', [('cpu',), ()], ids=['in turn', 'together'])
def test_rows_with_different_layouts(in_turn, monkeypatch):
  """Rows run one after another (each visits its own blocks) and as one
  vmap (the loops run the batch's longest lists) give the reference."""
  monkeypatch.setattr(_flash, 'ROWS_IN_TURN', in_turn)
  jax.clear_caches()  # compiled calls read ROWS_IN_TURN when traced
  check(ROW_LAYOUTS)


def test_when_rows_run_in_turn():
  def decide(backend='cpu', batch=(2,), q_len=T, mask=None, **options):
    q, k, v = helpers.qkv(0, batch=batch, q_len=q_len, kv_len=q_len)
    p = _prepare.prepare_arguments(query=q, key=k, value=v, mask=mask, **options)
    return _flash.rows_in_turn(p._replace(backend=backend), (8, 8))

  offsets = dict(q_offsets=jnp.array([0, 3]))
  assert decide(**offsets)
  assert decide(mask=helpers.random_mask(0, (2, 1, T, T)))
  assert not decide(is_causal=True)  # every row alike
  assert not decide(mask=helpers.random_mask(0, (1, 1, T, T)))
  assert not decide(batch=(1,), q_offsets=jnp.array([3]))
  assert not decide(q_len=8, **offsets)  # one block: nothing to choose
  assert not decide(backend='gpu', **offsets)


def test_the_block_plan_is_built_once_and_shared_by_the_backward():
  # The visit lists are sorted once per call: the gradient's program sorts
  # no more than the forward's (before, the backward sorted them again).
  q, k, v = helpers.qkv(0, q_len=64, kv_len=64)
  ids = jnp.array([[0] * 30 + [1] * 34, [0] * 64])
  for options in (dict(is_causal=True), dict(is_causal=True, q_segment_ids=ids)):
    f = lambda q, k, v, options=options: jattn.dot_product_attention(
      q, k, v, block_sizes=(16, 16), implementation='flash', **options
    ).sum()
    sorts = lambda fn: str(jax.make_jaxpr(fn)(q, k, v)).count(' sort[')
    assert sorts(f) >= 1
    assert sorts(jax.grad(f, argnums=(0, 1, 2))) == sorts(f), options
