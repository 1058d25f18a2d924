"""Mods and block masks never change what a call means: at offsets, over a
batch or heads they were not built for, beside another mod, and with bad
input a clear error rather than a silent wrong answer."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import cache as kv
from jattn import mods, testing
from tests import helpers


def causal(b, h, q_idx, kv_idx):
  return kv_idx <= q_idx


def by_batch(b, h, q_idx, kv_idx):
  return (kv_idx + 3 * b) % 4 != 0


def by_head(b, h, q_idx, kv_idx):
  return (kv_idx + h) % 3 != 0


@pytest.mark.parametrize('implementation', ['flash', 'reference'])
def test_a_block_mask_at_offsets_means_what_its_mod_means(implementation):
  q, k, v = helpers.qkv(0, q_len=32, kv_len=32)
  block_mask = jattn.create_block_mask(causal, None, None, 32, 32, block_sizes=(8, 8))
  offsets = dict(q_offsets=jnp.array([8, 16]), kv_offsets=jnp.array([3, 0]))
  testing.assert_functions_agree(
    lambda q, k, v: jattn.dot_product_attention(
      q, k, v, mask_mod=causal, implementation='reference', **offsets
    ),
    lambda q, k, v: jattn.dot_product_attention(
      q, k, v, block_mask=block_mask, implementation=implementation, **offsets
    ),
    q,
    k,
    v,
  )


def test_a_block_mask_in_a_chunked_prefill():
  # Every cache step passes offsets: the second chunk must mean the same.
  params = jattn.init_params(jax.random.key(1), 16, 4, num_kv_heads=2)
  x = jax.random.normal(jax.random.key(2), (2, 16, 16))
  docs = jnp.array([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
  mod = mods.document_mask(docs)
  block_mask = jattn.create_block_mask(mod, 2, None, 16, 16, block_sizes=(8, 8))
  full = jattn.multi_head_attention(params, x, is_causal=True, block_mask=block_mask)
  cache = kv.init_cache(params, 2, 16)
  step = jax.jit(kv.multi_head_attention_step)
  first, cache = step(params, x[:, :8], cache, block_mask=block_mask)
  second, cache = step(params, x[:, 8:], cache, block_mask=block_mask)
  testing.assert_trees_close(jnp.concatenate([first, second], 1), full, jnp.float32)


def test_a_mod_that_depends_on_b_or_h_needs_its_block_mask_to_say_so():
  q, k, v = helpers.qkv(3, q_len=16, kv_len=16)  # B = 2, H = 4
  for mod, size in ((by_batch, 'B'), (by_head, 'H')):
    shape = dict(B=(None, 4), H=(2, None))[size]
    with pytest.raises(ValueError, match=f'depends on `{size.lower()}`.*pass {size}'):
      jattn.create_block_mask(mod, *shape, 16, 16)
    # Built for one row or head by hand, used for all: refused in the call.
    one = dict(B=(1, 4), H=(2, 1))[size]
    block_mask = jattn.create_block_mask(mod, *one, 16, 16, block_sizes=(8, 8))
    with pytest.raises(ValueError, match=f'built for {size}=1 but its mask_mod'):
      jattn.dot_product_attention(q, k, v, block_mask=block_mask)
    # Built for every row and head: flash skips per row and head, rightly.
    block_mask = jattn.create_block_mask(mod, 2, 4, 16, 16, block_sizes=(8, 8))
    testing.assert_functions_agree(
      lambda q, k, v, mod=mod: jattn.dot_product_attention(
        q, k, v, mask_mod=mod, implementation='reference'
      ),
      lambda q, k, v, b=block_mask: jattn.dot_product_attention(
        q, k, v, block_mask=b, implementation='flash'
      ),
      q,
      k,
      v,
      check_grads=False,  # flash's gradients with per-head states: test_mods.py
    )


def test_a_mask_mod_over_other_arrays_is_not_the_block_mask_s():
  q, k, v = helpers.qkv(4, q_len=16, kv_len=16)
  ids_a = jnp.zeros((2, 16), jnp.int32)
  ids_b = jnp.arange(32).reshape(2, 16) // 4
  block_mask = jattn.create_block_mask(mods.document_mask(ids_a), 2, None, 16, 16)
  with pytest.raises(ValueError, match='different mods'):
    jattn.dot_product_attention(
      q, k, v, block_mask=block_mask, mask_mod=mods.document_mask(ids_b)
    )
  # The same mod over the same arrays is the block mask's: accepted.
  same = jattn.dot_product_attention(
    q, k, v, block_mask=block_mask, mask_mod=block_mask.mask_mod
  )
  testing.assert_trees_close(
    same, jattn.dot_product_attention(q, k, v, block_mask=block_mask), jnp.float32
  )


def test_ready_mods_check_their_arrays_against_the_call():
  q, k, v = helpers.qkv(5, q_len=8, kv_len=8)  # B = 2, H = 4, K = 2
  call = lambda **mod: jattn.dot_product_attention(q, k, v, **mod)
  with pytest.raises(ValueError, match=r'`slopes` \[H\] has 2 heads; .* H=4'):
    call(score_mod=mods.alibi(mods.alibi_slopes(2)))  # K passed for H
  with pytest.raises(ValueError, match=r'`table` \[num_buckets, H\] has 2 heads'):
    call(score_mod=mods.relative_position_bias(jnp.zeros((32, 2))))
  for shape in ((3, 8), (2, 5)):  # another batch; fewer positions than T
    with pytest.raises(ValueError, match=re.escape(f'got shape {shape}')):
      call(mask_mod=mods.document_mask(jnp.zeros(shape, jnp.int32)))
  # Ids longer than the call (a cache's positions) are fine; positions past
  # their end see nothing.
  ids = jnp.zeros((2, 6), jnp.int32)
  out = jattn.dot_product_attention(
    q[:, :4],
    k[:, :6],
    v[:, :6],
    mask_mod=mods.document_mask(ids),
    q_offsets=jnp.array([0, 4]),
  )
  np.testing.assert_array_equal(out[1, 2:], 0.0)  # positions 6, 7: no ids
  assert np.abs(out[1, :2]).sum() > 0


IDS = jnp.zeros((2, 4), jnp.int32)


@pytest.mark.parametrize(
  'make, error, match',
  [
    (lambda: mods.relative_position_bias(jnp.zeros((32, 4)), max_distance=4),
     ValueError, 'must exceed the 8 exact buckets'),
    (lambda: mods.relative_position_bias(jnp.zeros((3, 4))),
     ValueError, 'at least 4 buckets'),
    (lambda: mods.relative_position_buckets(
      jnp.arange(4), 0, bidirectional=True, max_distance=128),
     ValueError, '`num_buckets` must be >= 4'),
    (lambda: mods.relative_position_buckets(
      jnp.arange(4), -4, bidirectional=False, max_distance=128),
     ValueError, '`num_buckets` must be >= 2'),
    (lambda: mods.relative_position_buckets(
      jnp.arange(4), 2.5, bidirectional=True, max_distance=128),
     TypeError, '`num_buckets` must be an int'),
    (lambda: mods.relative_position_buckets(
      jnp.arange(4.0), 32, bidirectional=True, max_distance=128),
     TypeError, '`relative_position` must have an integer dtype'),
    (lambda: mods.document_mask(jnp.zeros((2, 4, 1), jnp.int32)),
     ValueError, r'`q_ids` must be \[B\|1, T\|S\]'),
    (lambda: mods.document_mask(IDS, q_global=jnp.zeros((2, 4))),
     TypeError, '`q_global` must be boolean'),
  ],
)  # fmt: skip
def test_bad_ready_mods_are_clear_errors(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_every_bucket_lies_in_the_table():
  # The smallest max_distance allowed, and distances far past it.
  rel = jnp.arange(-600, 600, dtype=jnp.int32)
  for bidirectional, buckets in ((True, 8), (False, 4), (True, 32)):
    exact = (buckets // 2 if bidirectional else buckets) // 2
    out = mods.relative_position_buckets(
      rel, buckets, bidirectional=bidirectional, max_distance=exact + 1
    )
    assert int(out.min()) >= 0 and int(out.max()) < buckets


def test_unclear_inputs_get_clear_errors():
  q, k, v = helpers.qkv(6, q_len=8, kv_len=8)
  for sizes in (8, (8,), (8, 8, 8)):
    with pytest.raises(
      ValueError, match='`block_sizes` must be a \\(query, key\\) pair'
    ):
      jattn.create_block_mask(causal, None, None, 8, 8, block_sizes=sizes)

  def python_if(b, h, q_idx, kv_idx):
    if q_idx > kv_idx:  # noqa: SIM103 (the mistake under test)
      return True
    return False

  with pytest.raises(TypeError, match='`mask_mod` must be written with jnp'):
    jattn.dot_product_attention(q, k, v, mask_mod=python_if)
  with pytest.raises(TypeError, match='`score_mod` must be written with jnp'):
    jattn.dot_product_attention(
      q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + float(q_idx)
    )


def test_a_callable_object_is_a_mod():
  @dataclasses.dataclass
  class Window:  # a dataclass: not hashable
    size: int

    def __call__(self, b, h, q_idx, kv_idx):
      return jnp.abs(q_idx - kv_idx) <= self.size

  q, k, v = helpers.qkv(7, q_len=8, kv_len=8)
  testing.assert_trees_close(
    jattn.dot_product_attention(q, k, v, mask_mod=Window(2)),
    jattn.dot_product_attention(q, k, v, local_window_size=2),
    jnp.float32,
  )


@pytest.mark.parametrize('implementation', ['reference', 'flash', 'decode'])
def test_an_infinite_sink_takes_every_weight(implementation):
  # The limit of a growing sink: zero outputs, zero (finite) gradients.
  q, k, v = helpers.qkv(8, q_len=3, kv_len=9)
  sinks = jnp.array([jnp.inf, 0.5, -jnp.inf, 1.0])

  def attend(q, k, v, sinks):
    return jattn.dot_product_attention(
      q, k, v, sinks=sinks, is_causal=True, implementation=implementation
    )

  out = attend(q, k, v, sinks)
  np.testing.assert_array_equal(out[:, :, 0], 0.0)
  finite = jattn.dot_product_attention(
    q, k, v, sinks=sinks.at[0].set(0.0), is_causal=True, implementation='reference'
  )
  testing.assert_trees_close(out[:, :, 1:], finite[:, :, 1:], jnp.float32)
  grads = jax.grad(lambda *a: attend(*a).sum(), argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for g in grads:
    assert np.isfinite(g).all()
  np.testing.assert_array_equal(grads[0][:, :, 0], 0.0)
  assert float(grads[3][0]) == 0.0
