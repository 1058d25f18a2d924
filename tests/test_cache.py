"""Inference: caches (dense, paged), the cached step, the decode kernel."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import jattn
from jattn import _decode, _prepare, sharding, testing
from jattn import cache as kv
from tests import helpers
from tests.test_multihead import flax_nnx_with

E, H, K = 16, 4, 2
LENGTH = 11  # odd: pages and blocks end inside it


def setup(seed=0, batch=2, sinks=False):
  params = jattn.init_params(
    jax.random.key(seed), E, H, num_kv_heads=K, use_sinks=sinks
  )
  if sinks:
    params['sinks'] = jnp.array([0.5, -1.0, 1.5, 0.0])
  x = jax.random.normal(jax.random.key(seed + 1), (batch, LENGTH, E))
  return params, x


def empty(params, kind, batch=2, shuffle_seed=None):
  """A fresh cache of ``kind`` ('dense' or 'paged') with room for 16."""
  if kind == 'dense':
    return kv.init_cache(params, batch, 16), None
  cache = kv.init_paged_cache(params, batch, num_pages=10, page_size=4, max_pages=4)
  free = jnp.ones(10, bool)
  if shuffle_seed is not None:  # take some pages away: a random layout
    taken = jax.random.permutation(jax.random.key(shuffle_seed), 10)[:2]
    free = free.at[taken].set(False)
  return cache, free


def run_steps(params, x, kind, chunks, shuffle_seed=None, **options):
  """The outputs of the steps over ``chunks`` of x, concatenated."""
  cache, free = empty(params, kind, x.shape[0], shuffle_seed)
  step = functools.partial(kv.multi_head_attention_step, **options)  # static options
  step = jax.jit(step, donate_argnames='cache')
  outs = []
  for start, stop in chunks:
    if free is not None:
      cache, free = kv.allocate_pages(cache, stop - start, free)
    out, cache = step(params, x[:, start:stop], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


PREFILL_THEN_DECODE = [(0, 5)] + [(i, i + 1) for i in range(5, LENGTH)]


@pytest.mark.parametrize('kind, sinks', [('dense', False), ('paged', True)])
def test_prefill_and_decode_equal_causal_attention_over_the_whole(
  kind, sinks, keys_per_step
):
  params, x = setup(sinks=sinks)
  full = jattn.multi_head_attention(params, x, is_causal=True)
  out, cache = run_steps(params, x, kind, PREFILL_THEN_DECODE, shuffle_seed=3)
  testing.assert_trees_close(out, full, jnp.float32)
  np.testing.assert_array_equal(cache.lengths, [LENGTH, LENGTH])


def test_dense_and_paged_caches_hold_the_same_keys():
  params, x = setup(1)
  chunks = [(0, 3), (3, 4), (4, 9), (9, 10)]
  _, dense = run_steps(params, x, 'dense', chunks)
  for seed in (0, 1):
    _, paged = run_steps(params, x, 'paged', chunks, shuffle_seed=seed)
    pages = paged.key_pages[paged.page_table]  # [B, max_pages, K, page, D]
    keys = pages.swapaxes(2, 3).reshape(2, -1, K, E // H)[:, :10]
    np.testing.assert_array_equal(keys, dense.key.swapaxes(1, 2)[:, :10])


def test_mask_rules_mean_in_decode_what_they_mean_in_training():
  params, x = setup(2)
  alibi = jattn.mods.alibi(jattn.mods.alibi_slopes(H))
  options = dict(local_window_size=(3, 0), score_mod=alibi)
  full = jattn.multi_head_attention(params, x, is_causal=True, **options)
  for kind in ('dense', 'paged'):
    out, _ = run_steps(params, x, kind, PREFILL_THEN_DECODE, **options)
    testing.assert_trees_close(out, full, jnp.float32)


def test_a_ragged_batch_is_one_call():
  params, x = setup(3)
  # Sequence 0 takes 4 then 3 tokens, sequence 1 takes 2 then 5: padded rows
  # of a call are not written and return zeros.
  cache = kv.init_cache(params, 2, 16)
  first = jnp.array([4, 2])
  out1, cache = kv.multi_head_attention_step(params, x[:, :4], cache, num_new=first)
  second = jnp.array([3, 5])
  rows = jnp.stack([x[0, 4:9], jnp.concatenate([x[1, 2:7]])])
  out2, cache = kv.multi_head_attention_step(params, rows, cache, num_new=second)
  np.testing.assert_array_equal(cache.lengths, [7, 7])
  for b, (n1, n2) in enumerate([(4, 3), (2, 5)]):
    alone = x[b : b + 1, : n1 + n2]
    full = jattn.multi_head_attention(params, alone, is_causal=True)[0]
    testing.assert_trees_close(out1[b, :n1], full[:n1], jnp.float32)
    testing.assert_trees_close(out2[b, :n2], full[n1:], jnp.float32)
    np.testing.assert_array_equal(out1[b, n1:], 0.0)
    np.testing.assert_array_equal(out2[b, n2:], 0.0)


def test_gradients_through_cached_keys(monkeypatch):
  # Prefill, then decode steps that read the keys the earlier steps cached:
  # the values and the gradients (every parameter, every input token) of
  # causal attention over the whole, through a paged cache (read one page
  # per step: the merge of steps is differentiated too; the one-step read's
  # gradients are test_cache_isolation's) and a dense one.
  monkeypatch.setattr(kv, 'KEYS_PER_STEP', 4)
  params, x = setup(4, sinks=True)
  chunks = [(0, 5), (5, 6), (6, LENGTH)]

  def stepped(kind):
    def run(params, x):
      cache, free = empty(params, kind, x.shape[0], shuffle_seed=1)
      outs = []
      for start, stop in chunks:
        if free is not None:
          cache, free = kv.allocate_pages(cache, stop - start, free)
        out, cache = kv.multi_head_attention_step(params, x[:, start:stop], cache)
        outs.append(out)
      return jnp.concatenate(outs, axis=1)

    return jax.jit(run)

  def whole(params, x):
    return jattn.multi_head_attention(params, x, is_causal=True)

  for kind in ('paged', 'dense'):
    testing.assert_functions_agree(
      whole, stepped(kind), params, x, argnums=(0, 1), dtype=jnp.float32
    )


FEATURES = {  # combined: suite time
  'causal at offsets, lengths, soft-cap, sinks': dict(
    is_causal=True,
    q_offsets=jnp.array([5, 30]),
    key_value_seq_lengths=jnp.array([0, 20]),
    logits_soft_cap=2.0,
    sinks=jnp.array([0.3, -1.0, 2.0, 0.0]),
  ),
  'mods and a bias': dict(
    score_mod=jattn.mods.alibi(jattn.mods.alibi_slopes(4)),
    mask_mod=lambda b, h, q_idx, kv_idx: (q_idx + kv_idx + h) % 3 != 0,
    bias=jax.random.normal(jax.random.key(2), (2, 4, 2, 37)),
  ),
}


@pytest.mark.parametrize('feature', sorted(FEATURES), ids=str)
def test_decode_kernel_matches_the_reference(feature):
  q, k, v = helpers.qkv(0, q_len=2, kv_len=37)
  options = dict(FEATURES[feature])
  bias = options.pop('bias', None)

  def attend(implementation):
    return lambda q, k, v: jattn.dot_product_attention(
      q, k, v, bias, implementation=implementation, **options
    )

  testing.assert_functions_agree(attend('reference'), attend('decode'), q, k, v)

  def stored(q, k, v):  # keys and values as a cache holds them: [B, K, S, X]
    return jattn.attention.attention_of_stored(
      q, k.swapaxes(1, 2), v.swapaxes(1, 2), bias=bias, implementation='decode',
      **options,
    )  # fmt: skip

  testing.assert_functions_agree(attend('reference'), stored, q, k, v)


def test_split_kv_equals_one_pass():
  q, k, v = helpers.qkv(1, q_len=1, kv_len=512)
  p = _prepare.prepare_arguments(
    query=q, key=k, value=v, q_offsets=jnp.array([300, 511]), is_causal=True,
    sinks=jnp.ones(4),
  )  # fmt: skip
  one = _decode.decode_attention(p, 1)
  for splits in (2, 4):
    testing.assert_trees_close(_decode.decode_attention(p, splits), one, jnp.float32)
  assert (
    _decode.split_count(4096, 'gpu') == 16 and _decode.split_count(4096, 'cpu') == 1
  )
  assert _decode.split_count(384, 'gpu') == 2  # chunks of at least 128 that divide S


def test_automatic_choice_takes_decode_for_few_queries_and_many_keys():
  def chosen(q_len, kv_len, heads=4):
    q, k, v = helpers.qkv(0, q_len=q_len, kv_len=kv_len, heads=heads)
    p = _prepare.prepare_arguments(query=q, key=k, value=v)
    return jattn._registry.select(p).name

  assert chosen(1, 1024) == 'decode'
  assert chosen(8, 2048) == 'decode'
  assert chosen(1, 512) == 'flash'  # a block or two: flash
  assert chosen(64, 1024) == 'flash'  # T·G = 128 rows per KV head
  with pytest.raises(ValueError, match='T·G = 128 query rows per KV head'):
    jattn.dot_product_attention(*helpers.qkv(0, q_len=64), implementation='decode')


def test_nnx_and_linen_decode_step_by_step_equal_flax():
  params, x = setup(5)
  params = jattn.init_params(jax.random.key(5), E, H)  # Flax's decode: K = H
  theirs = flax_nnx_with(params)
  ours = jattn.nnx.MultiHeadAttention.from_params(params)
  for module in (theirs, ours):
    module.init_cache(x.shape)
  linen = jattn.linen.MultiHeadAttention(num_heads=H, decode=True)
  linen_cache = linen.init(jax.random.key(0), x)['cache']
  flax_linen = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=E, decode=True)
  flax_cache = flax_linen.init(jax.random.key(0), x)['cache']
  for i in range(LENGTH):
    token = x[:, i : i + 1]
    expected = theirs(token, decode=True)
    testing.assert_trees_close(ours(token, decode=True), expected, jnp.float32)
    out, state = linen.apply(
      {'params': params, 'cache': linen_cache}, token, mutable=['cache']
    )
    linen_cache = state['cache']
    flax_out, state = flax_linen.apply(
      {'params': params, 'cache': flax_cache}, token, mutable=['cache']
    )
    flax_cache = state['cache']
    testing.assert_trees_close(out, flax_out, jnp.float32)
  # A prefill call of several tokens, then the rest: causal attention, in
  # nnx and in linen.
  ours.init_cache(x.shape)
  steps = jnp.concatenate([ours(x[:, :7], decode=True), ours(x[:, 7:], decode=True)], 1)
  full = jattn.multi_head_attention(params, x, is_causal=True)
  testing.assert_trees_close(steps, full, jnp.float32)
  linen_cache, outs = linen.init(jax.random.key(0), x)['cache'], []
  for chunk in (x[:, :7], x[:, 7:]):
    out, state = linen.apply(
      {'params': params, 'cache': linen_cache}, chunk, mutable=['cache']
    )
    linen_cache = state['cache']
    outs.append(out)
  testing.assert_trees_close(jnp.concatenate(outs, 1), full, jnp.float32)


def test_the_right_answer_where_flax_decode_with_is_causal_is_wrong():
  # flax#5591: Flax's decode with is_causal=True lets the query see key 0 only.
  params = jattn.init_params(jax.random.key(6), E, H)
  x = jax.random.normal(jax.random.key(7), (2, 5, E))
  full = jattn.multi_head_attention(params, x, is_causal=True)
  theirs = flax_nnx_with(params)
  adapter = flax_nnx_with(params, attention_fn=jattn.flax_attention_fn())
  outs = {}
  for name, module in (('flax', theirs), ('adapter', adapter)):
    module.init_cache(x.shape)
    steps = [module(x[:, i : i + 1], decode=True, is_causal=True) for i in range(5)]
    outs[name] = jnp.concatenate(steps, axis=1)
  assert float(jnp.abs(outs['flax'] - full).max()) > 0.1  # Flax's bug
  testing.assert_trees_close(outs['adapter'], full, jnp.float32)


def test_decode_step_sharded_equals_one_device():
  params, x = setup(8, batch=4)
  mesh = sharding.make_mesh({'data': 4, 'model': 2})
  cache = kv.init_cache(params, 4, 16)
  specs = sharding.cache_specs(cache, mesh)
  assert specs.key == jax.sharding.PartitionSpec('data', 'model', None, None)
  put = lambda tree, spec: jax.tree.map(
    lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, spec
  )
  sharded_cache = put(cache, specs)
  sharded_params = put(params, sharding.param_specs(params, mesh))
  step = jax.jit(kv.multi_head_attention_step)
  out, new = step(params, x[:, :3], cache)
  sharded_out, sharded_new = step(sharded_params, x[:, :3], sharded_cache)
  testing.assert_trees_close(sharded_out, out, jnp.float32)
  testing.assert_trees_close(sharded_new.key, new.key, jnp.float32)
  paged = kv.init_paged_cache(params, 4, num_pages=8, page_size=4, max_pages=2)
  assert sharding.cache_specs(paged, mesh).page_table == jax.sharding.PartitionSpec(
    'data', None
  )


def test_cache_size_and_no_copy_per_step():
  # D = 64, as in a real model: a copy of the cache would dwarf the logits.
  params = jattn.init_params(jax.random.key(10), E, H, num_kv_heads=K, head_dim=64)
  x = jax.random.normal(jax.random.key(11), (2, 1, E))
  cache = kv.init_cache(params, 2, 1024)
  assert cache.key.nbytes + cache.value.nbytes == 2 * 1024 * K * (64 + 64) * 4
  step = jax.jit(kv.multi_head_attention_step, donate_argnames='cache')
  compiled = step.lower(params, x, cache).compile()
  assert testing.temp_bytes(compiled) < cache.key.nbytes / 4
  paged = kv.init_paged_cache(params, 2, num_pages=16, page_size=64, max_pages=8)
  paged, _ = kv.allocate_pages(paged, 300, jnp.ones(16, bool))
  # A paged step reads KEYS_PER_STEP keys at a time: a long pool (64 pages
  # of 256 per sequence, 16384 keys) is never gathered whole.
  pool = kv.init_paged_cache(params, 2, num_pages=128, page_size=256, max_pages=64)
  compiled = step.lower(params, x, pool).compile()
  gathered = 2 * kv.KEYS_PER_STEP * K * (64 + 64) * 4  # keys and values, float32
  whole = pool.key_pages.nbytes + pool.value_pages.nbytes  # both sequences' all
  assert testing.temp_bytes(compiled) < 3 * gathered < whole / 2
  for before in (cache, paged):
    pointers = [a.unsafe_buffer_pointer() for a in jax.tree.leaves(before)]
    _, after = step(params, x, before)
    # Donated and updated in place: the step's cache is the same memory.
    assert all(a.is_deleted() for a in jax.tree.leaves(before))
    written = after.key if isinstance(after, kv.KVCache) else after.key_pages
    assert written.unsafe_buffer_pointer() in pointers


def test_bad_caches_are_clear_errors():
  params, x = setup(11)
  cache = kv.init_cache(params, 2, 8)
  with pytest.raises(ValueError, match='the cache holds bfloat16'):
    kv.multi_head_attention_step(
      params, x[:, :1], kv.init_cache(params, 2, 8, jnp.bfloat16)
    )
  other = jattn.init_params(jax.random.key(0), E, H, num_kv_heads=4)
  with pytest.raises(ValueError, match=r'keys of \(K, D\) = \(4, 4\)'):
    kv.multi_head_attention_step(params, x[:, :1], kv.init_cache(other, 2, 8))
  with pytest.raises(ValueError, match='B=3 sequences'):
    kv.multi_head_attention_step(params, x[:, :1], kv.init_cache(params, 3, 8))
  with pytest.raises(TypeError, match='causal by construction'):
    kv.multi_head_attention_step(params, x[:, :1], cache, is_causal=True)
  with pytest.raises(TypeError, match=r'must be a jattn\.cache\.KVCache'):
    kv.multi_head_attention_step(params, x[:, :1], {'key': 1})
  with pytest.raises(ValueError, match='call `init_cache` first'):
    jattn.nnx.MultiHeadAttention.from_params(params)(x, decode=True)


def paged_with(cache, **fields):
  return kv.PagedKVCache(
    **{
      f: fields.get(f, getattr(cache, f)) for f in kv.PagedKVCache.__dataclass_fields__
    }
  )


def test_options_a_step_sets_itself_are_refused():
  params, x = setup(13)
  dense = kv.init_cache(params, 2, 8)
  paged, _ = empty(params, 'paged')
  step = kv.multi_head_attention_step
  two = jnp.array([1, 1])
  for cache in (dense, paged):
    for name, why in [
      ('q_offsets', "the new tokens sit at each sequence's length"),
      ('query_seq_lengths', '`num_new` says which rows are real'),
      ('kv_offsets', 'cached keys sit at positions'),
      ('key_value_seq_lengths', "the cache's lengths say"),
    ]:
      with pytest.raises(TypeError, match=f'takes no `{name}`: {why}'):
        step(params, x[:, :1], cache, **{name: two})
    with pytest.raises(TypeError, match='no `return_residual`'):
      step(params, x[:, :1], cache, return_residual=True)
  with pytest.raises(TypeError, match=r'no per-key array \(bias\)'):
    step(params, x[:, :1], paged, bias=jnp.zeros((2, H, 1, 16)))
  with pytest.raises(TypeError, match='takes no `q_offsets`'):
    kv.attend(x[:, :1, :, None], dense, jnp.zeros(2, jnp.int32), q_offsets=two)


def test_bad_counts_and_tables_are_clear_errors():
  params, x = setup(14)
  dense = kv.init_cache(params, 2, 8)
  paged, free = empty(params, 'paged')
  step = kv.multi_head_attention_step
  for bad in (jnp.array([-1, 2]), jnp.array([100, 1])):
    with pytest.raises(ValueError, match=r'`num_new` must be within \[0, T=3\]'):
      step(params, x[:, :3], dense, num_new=bad)
  with pytest.raises(TypeError, match='`num_new` must have an integer dtype'):
    step(params, x[:, :3], dense, num_new=jnp.array([1.7, 8.0]))
  with pytest.raises(ValueError, match=r'`free` must have shape \[P\]'):
    kv.allocate_pages(paged, 4, jnp.ones(12, bool))
  with pytest.raises(TypeError, match='`free` must be boolean'):
    kv.allocate_pages(paged, 4, jnp.ones(10, jnp.int32))
  with pytest.raises(ValueError, match=r'`num_new` must be >= 0'):
    kv.allocate_pages(paged, -3, free)
  with pytest.raises(ValueError, match=r'within \[0, capacity=8\]; sequence 1 has 9'):
    step(params, x[:, :1], kv.KVCache(dense.key, dense.value, jnp.array([0, 9])))
  for table, error, match in [
    (jnp.zeros((2, 4)), TypeError, '`cache.page_table` must have an integer'),
    (jnp.zeros((2,), jnp.int32), ValueError, 'layout \\[B, max_pages\\]'),
    (jnp.zeros((3, 4), jnp.int32), ValueError, r'shape \[B, max_pages\] = \(2, 4\)'),
  ]:
    with pytest.raises(error, match=match):
      step(params, x[:, :1], paged_with(paged, page_table=table))
  holed = paged_with(
    paged,
    page_table=jnp.array([[0, -1, 2, -1], [1, 3, -1, -1]]),
    lengths=jnp.array([6, 0]),
  )
  with pytest.raises(ValueError, match='sequence 0 has length 6 but its page table'):
    kv.check_cache(holed)


def test_under_jit_counts_are_clipped_and_lengths_say_what_is_stored():
  # Values cannot raise under jit: the outcome is safe and documented.
  params, x = setup(15)
  step = jax.jit(kv.multi_head_attention_step)
  dense = kv.init_cache(params, 2, 8)
  _, after = step(params, x[:, :3], dense, num_new=jnp.array([100, -1]))
  np.testing.assert_array_equal(after.lengths, [3, 0])
  full = kv.KVCache(dense.key, dense.value, jnp.array([99, 8]))  # past capacity
  out, after = step(params, x[:, :2], full)
  np.testing.assert_array_equal(after.lengths, [8, 8])
  np.testing.assert_array_equal(after.key, full.key)  # nothing written
  assert np.isfinite(out).all()


def test_paged_equals_dense_in_bfloat16(keys_per_step):
  # Pages merge float32 partial results by their float32 log-sum-exp, then
  # round once: with the same kernel, what a dense cache gives. The bound is
  # a tenth of a bfloat16 step at these magnitudes (~3) and of what bfloat16
  # against float32 inputs differ by here (0.013).
  params, x = setup(12)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  x = x.astype(jnp.bfloat16)
  options = dict(implementation='decode')
  dense, _ = run_steps(params, x, 'dense', PREFILL_THEN_DECODE, **options)
  paged, _ = run_steps(params, x, 'paged', PREFILL_THEN_DECODE, 4, **options)
  error = np.abs(np.asarray(paged, np.float32) - np.asarray(dense, np.float32)).max()
  assert error <= 1e-3, error
