"""Inference: key/value caches (dense and paged) and the multi-head step.

A step takes ``T >= 1`` new tokens per sequence: prefill is a step with a
long T, chunked prefill several, decode ``T = 1``. It projects them, writes
their keys and values at each sequence's own position (``cache.lengths``:
a ragged batch is one call), and attends causally at those positions: the
query at position p sees cached keys ``0..p``, through the public
per-sequence offsets, so window, chunk, sinks, ``mask_mod`` and
``score_mod`` mean in decode what they mean in training.

    cache = jattn.cache.init_cache(params, batch=8, capacity=4096)
    step = jax.jit(jattn.cache.multi_head_attention_step, donate_argnames='cache')
    out, cache = step(params, prompt, cache)          # prefill, [B, T, E]
    out, cache = step(params, next_token, cache)      # decode, [B, 1, E]

Writes never leave the cache: a token past the capacity (or, paged, past
the page table or to a page outside the pool) is dropped (a scatter with
``mode='drop'``), ``lengths`` stops at the capacity, and its query row still
attends to the stored keys. Check ``lengths + T <= capacity`` in the loop
that calls the step where that matters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jattn import _checks, _numerics
from jattn._options import as_int
from jattn.attention import attention_and_lse, dot_product_attention
from jattn.multihead import _check_params, _project, _projections


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('key', 'value', 'lengths'),
  meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A dense cache: ``key [B, S_max, K, D]``, ``value [B, S_max, K, V]``,
  ``lengths [B]`` int32 (tokens stored per sequence)."""

  key: jax.Array
  value: jax.Array
  lengths: jax.Array

  @property
  def capacity(self) -> int:
    return self.key.shape[1]


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('key_pages', 'value_pages', 'page_table', 'lengths'),
  meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """A paged cache: a pool of pages ``key_pages [P, page_size, K, D]``,
  ``value_pages [P, page_size, K, V]``; ``page_table [B, max_pages]`` int32,
  the pool page of each sequence's i-th page (-1: none); ``lengths [B]``."""

  key_pages: jax.Array
  value_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array

  @property
  def page_size(self) -> int:
    return self.key_pages.shape[1]

  @property
  def capacity(self) -> int:
    return self.page_table.shape[1] * self.page_size


def _kv_shapes(params, dtype):
  _check_params(params)
  _, kv_heads, head_dim = params['key']['kernel'].shape
  value_dim = params['value']['kernel'].shape[2]
  dtype = params['key']['kernel'].dtype if dtype is None else dtype
  return kv_heads, head_dim, value_dim, _checks.check_float_dtype(dtype, 'dtype')


def init_cache(params, batch: int, capacity: int, dtype=None) -> KVCache:
  """An empty dense cache for ``params``: K heads of ``params['key']`` (GQA
  keeps only those), ``capacity`` positions, ``dtype`` default the key
  kernel's. Exactly ``B·S_max·K·(D+V)·itemsize`` bytes plus the lengths."""
  batch = as_int(batch, 'batch', minimum=1)
  capacity = as_int(capacity, 'capacity', minimum=1)
  kv_heads, head_dim, value_dim, dtype = _kv_shapes(params, dtype)
  return KVCache(
    jnp.zeros((batch, capacity, kv_heads, head_dim), dtype),
    jnp.zeros((batch, capacity, kv_heads, value_dim), dtype),
    jnp.zeros((batch,), jnp.int32),
  )


def init_paged_cache(
  params, batch: int, num_pages: int, page_size: int, max_pages: int, dtype=None
) -> PagedKVCache:
  """An empty paged cache: a pool of ``num_pages`` pages of ``page_size``
  positions, a page table of ``max_pages`` per sequence, all unassigned
  (-1; ``allocate_pages`` assigns them)."""
  batch = as_int(batch, 'batch', minimum=1)
  num_pages = as_int(num_pages, 'num_pages', minimum=1)
  page_size = as_int(page_size, 'page_size', minimum=1)
  max_pages = as_int(max_pages, 'max_pages', minimum=1)
  kv_heads, head_dim, value_dim, dtype = _kv_shapes(params, dtype)
  return PagedKVCache(
    jnp.zeros((num_pages, page_size, kv_heads, head_dim), dtype),
    jnp.zeros((num_pages, page_size, kv_heads, value_dim), dtype),
    jnp.full((batch, max_pages), -1, jnp.int32),
    jnp.zeros((batch,), jnp.int32),
  )


def allocate_pages(cache: PagedKVCache, num_new, free):
  """Pages for ``num_new [B]`` more tokens per sequence: each sequence's
  missing pages take the lowest free pool pages, in batch order.

  ``free [P]`` bool marks the pool's free pages (a scheduler's; all True for
  a fresh pool). Returns ``(cache with its page table filled, free)``. A
  sequence that runs out of free pages or of page-table slots gets -1 there
  (its tokens past it are then dropped by the step). Pure and jittable.
  """
  page = cache.page_size
  needed = -(-(cache.lengths + jnp.asarray(num_new, jnp.int32)) // page)  # [B]
  slots = jnp.arange(cache.page_table.shape[1])
  wanted = (slots[None, :] < needed[:, None]) & (cache.page_table < 0)  # [B, M]
  order = jnp.cumsum(wanted.reshape(-1)) - 1  # the n-th page asked for
  free_pages = jnp.nonzero(free, size=free.shape[0], fill_value=-1)[0]
  granted = jnp.where(order < jnp.sum(free), free_pages[jnp.clip(order, 0)], -1)
  table = jnp.where(wanted.reshape(-1), granted, cache.page_table.reshape(-1))
  taken = (
    jnp.zeros_like(free)
    .at[jnp.where(wanted.reshape(-1), granted, -1)]
    .set(True, mode='drop')
  )
  cache = dataclasses.replace(cache, page_table=table.reshape(cache.page_table.shape))
  return cache, free & ~taken


def _positions(cache, num_new, q_len: int):
  """``(positions [B, T] of the new tokens, new [B] count, real [B, T])``."""
  num_new = (
    jnp.full(cache.lengths.shape, q_len, jnp.int32) if num_new is None else num_new
  )
  num_new = jnp.asarray(num_new).astype(jnp.int32)
  _checks.check_shape(num_new, 'num_new', cache.lengths.shape, '[B]')
  new = jnp.clip(num_new, 0, q_len)
  steps = jnp.arange(q_len, dtype=jnp.int32)
  return cache.lengths[:, None] + steps[None, :], new, steps[None, :] < new[:, None]


def write(cache, key, value, num_new=None):
  """The cache with ``key [B, T, K, D]``, ``value [B, T, K, V]`` stored at
  each sequence's next positions (the first ``num_new [B]`` of the T rows;
  default all), and ``lengths`` advanced (never past the capacity)."""
  positions, new, real = _positions(cache, num_new, key.shape[1])
  far = jnp.int32(cache.capacity)  # a position the scatter drops
  positions = jnp.where(real, positions, far)
  rows = jnp.arange(key.shape[0])[:, None]
  lengths = jnp.minimum(cache.lengths + new, cache.capacity)
  if isinstance(cache, KVCache):
    return KVCache(
      cache.key.at[rows, positions].set(key.astype(cache.key.dtype), mode='drop'),
      cache.value.at[rows, positions].set(value.astype(cache.value.dtype), mode='drop'),
      lengths,
    )
  page = cache.page_size
  slot = jnp.minimum(positions // page, cache.page_table.shape[1])
  table = jnp.pad(cache.page_table, ((0, 0), (0, 1)), constant_values=-1)
  pages = jnp.take_along_axis(table, slot, axis=1)  # [B, T]; -1: none
  pages = jnp.where(pages < 0, cache.key_pages.shape[0], pages)  # dropped
  offsets = positions % page
  return dataclasses.replace(
    cache,
    key_pages=cache.key_pages.at[pages, offsets].set(
      key.astype(cache.key_pages.dtype), mode='drop'
    ),
    value_pages=cache.value_pages.at[pages, offsets].set(
      value.astype(cache.value_pages.dtype), mode='drop'
    ),
    lengths=lengths,
  )


def attend(query, cache, start, num_new=None, **options):
  """``query [B, T, H, D]`` at positions ``start + i`` against everything
  in ``cache`` (already written), causally: ``[B, T, H, V]``. Paged caches
  are read page by page, merged by log-sum-exp."""
  if 'is_causal' in options:
    raise TypeError('a cache step is causal by construction: leave out `is_causal`.')
  _, new, _ = _positions(cache, num_new, query.shape[1])
  options = dict(options, is_causal=True, q_offsets=start, query_seq_lengths=new)
  if isinstance(cache, KVCache):
    return dot_product_attention(
      query, cache.key, cache.value, key_value_seq_lengths=cache.lengths, **options
    )
  return _paged_attention(query, cache, options)


# Keys a paged cache's attention gathers per step (whole pages, at least one).
KEYS_PER_STEP = 1024


def _paged_attention(query, cache: PagedKVCache, options):
  """Attention over a paged cache, a few pages at a time (``KEYS_PER_STEP``
  keys, gathered from the pool), merged by log-sum-exp."""
  sinks = options.pop('sinks', None)
  page, max_pages = cache.page_size, cache.page_table.shape[1]
  rows = query.shape[1] * query.shape[2] // cache.key_pages.shape[2]  # T·G
  if options.get('implementation') is None and rows <= 64:
    options['implementation'] = 'decode'  # few queries: decode at any length
  per_step = max(1, min(max_pages, KEYS_PER_STEP // page))
  while max_pages % per_step:
    per_step -= 1
  span = per_step * page  # keys per step

  def some_pages(carry, index):
    pages = jax.lax.dynamic_slice_in_dim(
      cache.page_table, index * per_step, per_step, 1
    )
    valid = pages >= 0  # [B, per_step]; the keys stop at the first hole
    first_hole = jnp.where(valid.all(1), per_step, jnp.argmin(valid, axis=1))
    seen = jnp.clip(cache.lengths - index * span, 0, span)
    seen = jnp.minimum(seen, first_hole * page)
    pages = jnp.where(valid, pages, 0)
    gather = lambda pool: pool[pages].reshape((pages.shape[0], span) + pool.shape[2:])
    out, lse = attention_and_lse(
      query,
      gather(cache.key_pages),
      gather(cache.value_pages),
      kv_offsets=jnp.full_like(cache.lengths, index * span),
      key_value_seq_lengths=seen,
      **options,
    )
    total = jnp.where(lse > -jnp.inf, 1.0, 0.0)
    return _numerics.merge(carry, (out, lse, total)), None

  shape = query.shape[:-1]
  init = _numerics.initial_stats(
    shape, None if sinks is None else sinks.astype(jnp.float32)
  )
  value_dim = cache.value_pages.shape[-1]
  init = (jnp.zeros(shape + (value_dim,), jnp.float32), *init)
  steps = jnp.arange(max_pages // per_step)
  (out, _, _), _ = jax.lax.scan(some_pages, init, steps)
  return out.astype(query.dtype)


def multi_head_attention_step(
  params, inputs_q, cache, *, num_new=None, dtype=None, **attention_kwargs
):
  """One step of self-attention with a cache: ``inputs_q [B, T, E]`` (the
  first ``num_new [B]`` rows of each sequence are real; default all) ->
  ``(out [B, T, F], the new cache)``.

  ``cache`` is a ``KVCache`` or ``PagedKVCache`` for ``params``.
  ``attention_kwargs``: ``jattn.dot_product_attention``'s options (window,
  chunk, soft-cap, ``mask_mod``, ``score_mod``, ...; not ``is_causal``: a
  step is causal). With ``params['sinks']`` the sinks join each row. Rows
  past ``num_new`` return zeros.
  """
  if not isinstance(cache, (KVCache, PagedKVCache)):
    raise TypeError(
      '`cache` must be a jattn.cache.KVCache or PagedKVCache; got '
      f'{type(cache).__name__}.'
    )
  query, key, value, dtype = _projections(params, inputs_q, None, None, dtype)
  _check_cache(cache, key, value)
  start = cache.lengths
  cache = write(cache, key, value, num_new)
  if 'sinks' in params:
    attention_kwargs = dict(attention_kwargs, sinks=params['sinks'])
  encoded = attend(query, cache, start, num_new, **attention_kwargs)
  return _project(encoded, params['out'], '...thv,hvf->...tf', dtype), cache


def _check_cache(cache, key, value) -> None:
  """The cache holds these heads, dims and batch."""
  stored = cache.key if isinstance(cache, KVCache) else cache.key_pages
  stored_v = cache.value if isinstance(cache, KVCache) else cache.value_pages
  if stored.shape[2:] != key.shape[2:] or stored_v.shape[2:] != value.shape[2:]:
    raise ValueError(
      f'the cache holds keys [..., K, D] = {tuple(stored.shape[2:])} and values '
      f'[..., K, V] = {tuple(stored_v.shape[2:])}; the parameters make '
      f'{tuple(key.shape[2:])} and {tuple(value.shape[2:])}.'
    )
  if stored.dtype != key.dtype:
    raise ValueError(
      f'the cache holds {stored.dtype}; this step computes in {key.dtype}: '
      'init the cache with dtype= the compute dtype (or pass dtype= here).'
    )
  if cache.lengths.shape != key.shape[:1]:
    raise ValueError(
      f'the cache is for B={cache.lengths.shape[0]} sequences; the inputs have '
      f'B={key.shape[0]} (shape {tuple(key.shape)}).'
    )
