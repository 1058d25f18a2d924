"""A sequence's isolation in a cache: what it reads is what it stored.

The property: changing any other sequence's tokens never changes a
sequence's outputs or gradients, whatever the page table holds (permuted
and interleaved pages, holes, entries outside the pool, shared pages, an
exhausted pool); and a paged sequence equals a dense cache that holds the
same tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import cache as kv
from jattn import testing
from tests.test_cache import E, H, K

POOL = 7
# Pages of 4; a sequence can store up to its first slot that is not a page
# of its own: seq 0 reads pages 5, 2 (9 is outside the pool); seq 1 page 1
# (then a hole); seq 2 page 6 (page 0 is seq 0's too: shared, read-only).
TABLE = [[5, 2, 9, 0], [1, -1, 3, 4], [6, 0, -1, -1]]
STORED = [8, 4, 4]  # what each sequence can hold, so what it reads
CHUNKS = [(0, 5), (5, 6), (6, 9), (9, 12)]


def new_step():
  """A jitted step traced anew (the keys-per-step setting is read then)."""
  return jax.jit(functools.partial(kv.multi_head_attention_step))


def tokens(seed, batch=3, length=12):
  return jax.random.normal(jax.random.key(seed), (batch, length, E))


@functools.cache
def model():
  return jattn.init_params(jax.random.key(0), E, H, num_kv_heads=K)


def messy_cache(params):
  cache = kv.init_paged_cache(params, 3, num_pages=POOL, page_size=4, max_pages=4)
  # Fill the pool with another conversation's keys: nothing may read them.
  stale = jax.random.normal(jax.random.key(99), cache.key_pages.shape)
  return kv.PagedKVCache(
    stale, stale, jnp.array(TABLE, jnp.int32), jnp.zeros(3, jnp.int32)
  )


@functools.partial(jax.jit, static_argnames='setting')
def run(params, x, cache, setting=None):
  """Every chunk through the step: (outputs [B, 12, F], the cache).
  ``setting``: the keys-per-step fixture's (it is read when tracing)."""
  outs = []
  for start, stop in CHUNKS:
    out, cache = kv.multi_head_attention_step(params, x[:, start:stop], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


def test_each_sequence_reads_only_what_it_stored(monkeypatch):
  # Read one page per step: every step of the read, and the merge of steps,
  # must keep to the sequence's own pages (the one-step read is the others').
  monkeypatch.setattr(kv, 'KEYS_PER_STEP', 4)
  params = model()
  run = functools.partial(globals()['run'], setting='one page per step')
  x = tokens(1)
  out, cache = run(params, x, messy_cache(params))
  np.testing.assert_array_equal(cache.lengths, STORED)
  for b, stored in enumerate(STORED):
    # The same tokens in a dense cache of the room the table gives.
    dense, _ = run(params, x[b : b + 1], kv.init_cache(params, 1, stored))
    testing.assert_trees_close(out[b], dense[0], jnp.float32)
    # Another sequence's tokens change nothing of this one: values, and the
    # gradient of its outputs with respect to every token.
    others = x.at[jnp.arange(3) != b].set(tokens(2)[jnp.arange(3) != b])
    changed, _ = run(params, others, messy_cache(params))
    np.testing.assert_array_equal(changed[b], out[b])
    if b == 1:  # gradients for the sequence with a hole (suite time)
      grad = jax.grad(lambda x: run(params, x, messy_cache(params))[0][1].sum())
      for inputs in (x, others):
        g = grad(inputs)
        np.testing.assert_array_equal(g[jnp.arange(3) != 1], 0.0)
        assert np.abs(g[1]).sum() > 0
      testing.assert_trees_close(grad(others)[1], grad(x)[1], jnp.float32)


def test_a_page_outside_the_pool_is_no_other_sequence_s_page(keys_per_step):
  # Two pages in the pool; sequence 0's second page (7) does not exist.
  params = model()
  cache = kv.init_paged_cache(params, 2, num_pages=2, page_size=4, max_pages=2)
  cache = kv.PagedKVCache(
    cache.key_pages, cache.value_pages, jnp.array([[0, 7], [1, -1]]), cache.lengths
  )
  step = new_step()
  x = tokens(3, batch=2, length=6)
  out, after = step(params, x, cache)
  np.testing.assert_array_equal(after.lengths, [4, 4])
  moved, _ = step(params, x.at[1].set(tokens(4, 1, 6)[0]), cache)
  np.testing.assert_array_equal(moved[0], out[0])
  # Eagerly, the table itself is refused.
  with pytest.raises(ValueError, match=r'page_table\[0, 1\] = 7 is neither -1'):
    kv.multi_head_attention_step(params, x, cache)


def test_an_exhausted_pool_stores_nothing_it_cannot_keep():
  # Three pages for two sequences of 8: sequence 1 gets one page and stores
  # 4 tokens. When sequence 0's pages are freed and handed to sequence 1,
  # sequence 1 goes on from its own 4 tokens, never from 0's old keys.
  params = model()
  x = tokens(5, batch=2, length=8)
  cache = kv.init_paged_cache(params, 2, num_pages=3, page_size=4, max_pages=3)
  free = jnp.ones(3, bool)
  step = new_step()
  cache, free = kv.allocate_pages(cache, 8, free)
  np.testing.assert_array_equal(cache.page_table, [[0, 1, -1], [2, -1, -1]])
  _, cache = step(params, x, cache)
  np.testing.assert_array_equal(cache.lengths, [8, 4])
  cache, free = kv.release(cache, jnp.array([True, False]), free)
  np.testing.assert_array_equal(free, [True, True, False])
  new = jnp.array([0, 3])
  cache, free = kv.allocate_pages(cache, new, free)
  np.testing.assert_array_equal(cache.page_table, [[-1, -1, -1], [2, 0, -1]])
  np.testing.assert_array_equal(free, [False, True, False])
  more = tokens(6, batch=2, length=3)
  out, cache = step(params, more, cache, num_new=new)
  np.testing.assert_array_equal(cache.lengths, [0, 7])
  history = jnp.concatenate([x[1:, :4], more[1:]], axis=1)
  full = jattn.multi_head_attention(params, history, is_causal=True)
  testing.assert_trees_close(out[1], full[0, 4:], jnp.float32)


def test_shared_pages_are_read_only_prefixes(keys_per_step):
  params = model()
  x = tokens(7, batch=2, length=11)
  cache = kv.init_paged_cache(params, 2, num_pages=6, page_size=4, max_pages=4)
  step = new_step()
  # Two tables holding the same pages from the start: neither may write.
  both = kv.PagedKVCache(
    cache.key_pages, cache.value_pages, jnp.array([[0, 1, -1, -1]] * 2), cache.lengths
  )
  out, after = step(params, x[:, :3], both)
  np.testing.assert_array_equal(after.lengths, [0, 0])
  np.testing.assert_array_equal(after.key_pages, both.key_pages)
  # Each row sees no stored key: attention gives zeros, the output its bias.
  np.testing.assert_array_equal(out, jnp.broadcast_to(params['out']['bias'], out.shape))
  # A prefix: sequence 0 writes 8 tokens, then sequence 1 shares its two
  # full pages; each goes on in pages of its own.
  table = jnp.array([[0, 1, -1, -1], [-1, -1, -1, -1]])
  cache = kv.PagedKVCache(cache.key_pages, cache.value_pages, table, cache.lengths)
  _, cache = step(params, x[:, :8], cache, num_new=jnp.array([8, 0]))
  table = jnp.array([[0, 1, 2, -1], [0, 1, 3, -1]])
  cache = kv.PagedKVCache(
    cache.key_pages, cache.value_pages, table, jnp.array([8, 8], jnp.int32)
  )
  kv.check_cache(cache)
  with pytest.raises(ValueError, match=r'pool pages \[0, 1\] are held by more'):
    kv.check_cache(cache, allow_shared=False)
  out, cache = step(params, x[:, 8:], cache)
  np.testing.assert_array_equal(cache.lengths, [11, 11])
  for b in range(2):
    history = jnp.concatenate([x[0, :8], x[b, 8:]])[None]
    full = jattn.multi_head_attention(params, history, is_causal=True)
    testing.assert_trees_close(out[b], full[0, 8:], jnp.float32)
  # A write to a shared page that is not full is dropped: sequence 0 at 6
  # would write into page 1, which sequence 1 reads.
  partial = kv.PagedKVCache(
    cache.key_pages, cache.value_pages, table, jnp.array([6, 8], jnp.int32)
  )
  _, after = step(params, x[:, :1], partial)
  np.testing.assert_array_equal(after.lengths, [6, 9])
  np.testing.assert_array_equal(after.key_pages[1], partial.key_pages[1])


def test_allocation_never_hands_out_a_held_page():
  params = model()
  cache = kv.init_paged_cache(params, 2, num_pages=4, page_size=2, max_pages=2)
  held = kv.PagedKVCache(
    cache.key_pages, cache.value_pages, jnp.array([[3, -1], [-1, -1]]), cache.lengths
  )
  # The scheduler thinks every page is free; page 3 is sequence 0's.
  allocated, free = kv.allocate_pages(held, jnp.array([4, 4]), jnp.ones(4, bool))
  np.testing.assert_array_equal(allocated.page_table, [[3, 0], [1, 2]])
  np.testing.assert_array_equal(free, [False, False, False, False])
