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

Isolation: a sequence reads only what its own writes stored, and no write
changes what another sequence reads.

- ``lengths [B]`` says what is stored: the positions ``0..lengths-1``. A
  step advances it by the new tokens it could store, up to the first it
  could not: past the capacity, or (paged) to a page-table slot of -1, to an
  entry outside the pool, or to a shared page. Those tokens and the ones
  after them are dropped (never written anywhere), and their query rows
  attend to what is stored. Compare ``lengths`` with what you wrote to see
  a drop (``check_cache`` checks a cache's values eagerly).
- Paged: a sequence reads its table's pages up to its length, and stops at
  the first entry that is not a pool page. A page held by more than one
  table entry is *shared* and read-only: every table holding it reads it
  (a common prefix, written before it was shared), no step writes to it.
  To share a prefix, point another sequence's table at the full pages of
  the prefix and set its length; each sequence then writes to pages of its
  own. ``allocate_pages`` hands out only pages no table holds.

Under ``jax.jit`` values cannot raise: a ``num_new`` outside ``[0, T]`` or
lengths outside ``[0, capacity]`` are clipped there; called eagerly, the
step checks them and raises.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jattn import _checks, _numerics, _params
from jattn._options import as_int
from jattn.attention import attention_of_stored
from jattn.block_mask import BlockMask


class _HeadMajor:
  """What both layouts share: keys and values stored ``[..., K, positions,
  D|V]`` (``_stored``)."""

  @property
  def kv_heads(self) -> int:
    return self._stored()[0].shape[1]

  @property
  def dtype(self):
    return self._stored()[0].dtype

  def head_dims(self):
    """``((K, D), (K, V))`` of what it stores."""
    key, value = (x.shape for x in self._stored())
    return (key[1], key[3]), (value[1], value[3])


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('key', 'value', 'lengths'),
  meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class KVCache(_HeadMajor):
  """A dense cache: ``key [B, K, S_max, D]``, ``value [B, K, S_max, V]``,
  ``lengths [B]`` int32 (tokens stored per sequence).

  Head-major, for its reads: each KV head's keys are one contiguous
  ``[S_max, D]`` matrix, so a decode step is a batched matrix product per
  KV head read where it lies (``python -m benchmarks.decode``: attention
  through the cache 1.16x to 1.26x faster than the same kernel on
  ``[B, S, K, D]`` arrays), as TPU paged-attention kernels keep their pools.
  The function API keeps ``[B, S, K, D]``."""

  key: jax.Array
  value: jax.Array
  lengths: jax.Array

  # Per-key arrays (bias, mask, segment ids) cover its keys as they lie.
  takes_per_key_arrays = True

  @property
  def capacity(self) -> int:
    return self.key.shape[2]

  def _stored(self):
    return self.key, self.value

  def specs(self, batch, model) -> KVCache:
    """PartitionSpecs: sequences over ``batch``, KV heads over ``model``
    (mesh axis names or None)."""
    return KVCache(P(batch, model, None, None), P(batch, model, None, None), P(batch))

  def _check_arrays(self) -> None:
    pass

  def _check_values(self, allow_shared: bool) -> None:
    pass

  def _readable(self):
    return self.capacity

  def _places(self, positions):
    """``(own [B, T], at)``: which positions have a place of the sequence's
    own, and where they go."""
    return jnp.ones(positions.shape, bool), positions

  def _store(self, key, value, positions, places, stored, lengths) -> KVCache:
    rows = jnp.arange(key.shape[0], dtype=jnp.int32)[:, None]
    at = jnp.where(stored, places, self.capacity)  # past the end: dropped
    # [rows, :, at] indexes [B, T, K, X] (the advanced indices first).
    return KVCache(
      self.key.at[rows, :, at].set(key.astype(self.key.dtype), mode='drop'),
      self.value.at[rows, :, at].set(value.astype(self.value.dtype), mode='drop'),
      lengths,
    )

  def _read(self, query, options):
    return attention_of_stored(
      query, self.key, self.value, key_value_seq_lengths=_stored_lengths(self),
      **options,
    )  # fmt: skip

  def _release(self, done, free):
    if free is not None:
      raise TypeError('a dense cache has no pages: pass no `free`.')
    return self


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=('key_pages', 'value_pages', 'page_table', 'lengths'),
  meta_fields=(),
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache(_HeadMajor):
  """A paged cache: a pool of pages ``key_pages [P, K, page_size, D]``,
  ``value_pages [P, K, page_size, V]`` (head-major, as ``KVCache``);
  ``page_table [B, max_pages]`` int32, the pool page of each sequence's
  i-th page (-1: none); ``lengths [B]``."""

  key_pages: jax.Array
  value_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array

  @property
  def page_size(self) -> int:
    return self.key_pages.shape[2]

  @property
  def num_pages(self) -> int:
    return self.key_pages.shape[0]

  @property
  def capacity(self) -> int:
    return self.page_table.shape[1] * self.page_size

  # Its keys lie in pages: per-key arrays ([..., S]) have no place to go.
  takes_per_key_arrays = False

  def _stored(self):
    return self.key_pages, self.value_pages

  def specs(self, batch, model) -> PagedKVCache:
    """PartitionSpecs: the pool's heads over ``model``, the page table and
    lengths' sequences over ``batch``."""
    pool = P(None, model, None, None)
    return PagedKVCache(pool, pool, P(batch, None), P(batch))

  def _check_arrays(self) -> None:
    table, batch = self.page_table, self.lengths.shape[0]
    _checks.check_array(table, 'cache.page_table', min_rank=2, layout='[B, max_pages]')
    _checks.check_integer(table, 'cache.page_table')
    _checks.check_shape(
      table, 'cache.page_table', (batch, table.shape[-1]), '[B, max_pages]'
    )

  def _check_values(self, allow_shared: bool) -> None:
    lengths, table = np.asarray(self.lengths), np.asarray(self.page_table)
    outside = np.argwhere((table < -1) | (table >= self.num_pages))
    if outside.size:
      b, i = outside[0]
      raise ValueError(
        f'cache.page_table[{b}, {i}] = {table[b, i]} is neither -1 nor a page '
        f'of the pool (0..{self.num_pages - 1}).'
      )
    readable = np.asarray(self._readable())
    short = np.flatnonzero(readable < lengths)
    if short.size:
      b = short[0]
      raise ValueError(
        f'sequence {b} has length {lengths[b]} but its page table has no page '
        f'from position {readable[b]} on: {table[b].tolist()}.'
      )
    if not allow_shared:
      pages, counts = np.unique(table[table >= 0], return_counts=True)
      if (counts > 1).any():
        raise ValueError(
          f'pool pages {pages[counts > 1].tolist()} are held by more than one '
          'page-table entry (shared, read-only).'
        )

  def _readable(self):
    """``[B]``: each sequence's positions before its first table entry that
    is not a pool page (the most a read may cover)."""
    valid = _in_pool(self, self.page_table)
    max_pages = valid.shape[1]
    first_hole = jnp.where(valid.all(1), max_pages, jnp.argmin(valid, axis=1))
    return first_hole.astype(jnp.int32) * self.page_size

  def _places(self, positions):
    """``(own [B, T], pages [B, T])``: a position's place is its table
    entry's page, when a pool page that no other entry holds."""
    slot = jnp.minimum(positions // self.page_size, self.page_table.shape[1])
    table = jnp.pad(self.page_table, ((0, 0), (0, 1)), constant_values=-1)
    pages = jnp.take_along_axis(table, slot, axis=1)  # [B, T]
    own = _in_pool(self, pages)
    own &= _held(self)[jnp.clip(pages, 0, self.num_pages - 1)] == 1
    return own, pages

  def _store(self, key, value, positions, pages, stored, lengths) -> PagedKVCache:
    at = jnp.where(stored, pages, self.num_pages)  # no such page: dropped
    offsets = positions % self.page_size
    return dataclasses.replace(
      self,
      key_pages=self.key_pages.at[at, :, offsets].set(
        key.astype(self.key_pages.dtype), mode='drop'
      ),
      value_pages=self.value_pages.at[at, :, offsets].set(
        value.astype(self.value_pages.dtype), mode='drop'
      ),
      lengths=lengths,
    )

  def _read(self, query, options):
    return _paged_attention(query, self, options)

  def _release(self, done, free):
    if free is None:
      raise TypeError('`free` [P] is required for a paged cache.')
    free = _check_free(self, free)
    held = self.page_table
    cache = dataclasses.replace(self, page_table=jnp.where(done[:, None], -1, held))
    dropped = jnp.where(done[:, None] & _in_pool(self, held), held, self.num_pages)
    released = jnp.zeros_like(free).at[dropped.reshape(-1)].set(True, mode='drop')
    return cache, free | (released & (_held(cache) == 0))


def _kv_shapes(params, dtype):
  _params.check_params(params)
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
    jnp.zeros((batch, kv_heads, capacity, head_dim), dtype),
    jnp.zeros((batch, kv_heads, capacity, value_dim), dtype),
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
    jnp.zeros((num_pages, kv_heads, page_size, head_dim), dtype),
    jnp.zeros((num_pages, kv_heads, page_size, value_dim), dtype),
    jnp.full((batch, max_pages), -1, jnp.int32),
    jnp.zeros((batch,), jnp.int32),
  )


def _check_layout(cache) -> None:
  """The cache's arrays agree in shape and dtype (trace time)."""
  if not isinstance(cache, (KVCache, PagedKVCache)):
    raise TypeError(
      '`cache` must be a jattn.cache.KVCache or PagedKVCache; got '
      f'{type(cache).__name__}.'
    )
  lengths = cache.lengths
  _checks.check_array(lengths, 'cache.lengths', min_rank=1, layout='[B]')
  _checks.check_integer(lengths, 'cache.lengths')
  _checks.check_shape(lengths, 'cache.lengths', lengths.shape[:1], '[B]')
  cache._check_arrays()


def _concrete(*arrays) -> bool:
  """Whether every array holds values (eager), not tracers."""
  return not any(isinstance(x, jax.core.Tracer) for x in arrays)


def check_cache(cache, *, allow_shared: bool = True) -> None:
  """Check a cache's values eagerly (outside ``jax.jit``): lengths within
  ``[0, capacity]``; paged, every table entry -1 or a pool page, every
  stored position on a pool page (no hole before a sequence's length), and,
  with ``allow_shared=False``, no page held by two table entries. Raises a
  ValueError that says which sequence and entry."""
  _check_layout(cache)
  lengths = np.asarray(cache.lengths)
  bad = np.flatnonzero((lengths < 0) | (lengths > cache.capacity))
  if bad.size:
    raise ValueError(
      f'cache.lengths must be within [0, capacity={cache.capacity}]; sequence '
      f'{bad[0]} has {lengths[bad[0]]}.'
    )
  cache._check_values(allow_shared)


def _check_count(num_new, name: str, shape, high: int | None):
  """``num_new`` (a scalar or ``[B]``) as int32 ``[B]``: integers, checked
  to lie in ``[0, high]`` when eager."""
  num_new = jnp.asarray(num_new)
  _checks.check_integer(num_new, name)
  if num_new.ndim:
    _checks.check_shape(num_new, name, shape, '[B] (or a scalar)')
  if _concrete(num_new):
    values = np.asarray(num_new)
    if (values < 0).any() or (high is not None and (values > high).any()):
      bound = f'within [0, T={high}]' if high is not None else '>= 0'
      raise ValueError(f'`{name}` must be {bound}; got {values.tolist()}.')
  return jnp.broadcast_to(num_new.astype(jnp.int32), shape)


def _check_free(cache: PagedKVCache, free):
  """``free [P]`` bool, one flag per pool page."""
  free = jnp.asarray(free)
  if free.dtype != jnp.bool_:
    raise TypeError(f'`free` must be boolean [P] (True: free); got {free.dtype}.')
  _checks.check_shape(free, 'free', (cache.num_pages,), '[P] (one per pool page)')
  return free


def _new_count(cache, num_new, q_len: int):
  """``[B]`` int32: the real rows of each sequence (default all T)."""
  if num_new is None:
    return jnp.full(cache.lengths.shape, q_len, jnp.int32)
  num_new = _check_count(num_new, 'num_new', cache.lengths.shape, q_len)
  return jnp.clip(num_new, 0, q_len)


def _held(cache: PagedKVCache):
  """``[P]`` int32: how many page-table entries hold each pool page."""
  table = cache.page_table.reshape(-1)
  index = jnp.where(table >= 0, table, cache.num_pages)  # -1 would wrap
  return jnp.zeros(cache.num_pages, jnp.int32).at[index].add(1, mode='drop')


def _in_pool(cache: PagedKVCache, pages):
  return (pages >= 0) & (pages < cache.num_pages)


def _stored_lengths(cache):
  """``[B]``: the positions a read covers, whatever the lengths say."""
  lengths = jnp.clip(cache.lengths.astype(jnp.int32), 0, cache.capacity)
  return jnp.minimum(lengths, cache._readable())


def allocate_pages(cache: PagedKVCache, num_new, free):
  """Pages for ``num_new [B]`` more tokens per sequence: each sequence's
  missing pages take the lowest free pool pages, in batch order.

  ``free [P]`` bool marks the pool's free pages (a scheduler's; all True for
  a fresh pool); a page some table holds is never handed out, whatever
  ``free`` says. Returns ``(cache with its page table filled, free)``. A
  sequence that runs out of free pages or of page-table slots gets -1 there
  (the step then stores its tokens up to it and drops the rest). Pure and
  jittable.
  """
  _check_layout(cache)
  num_new = _check_count(num_new, 'num_new', cache.lengths.shape, None)
  free = _check_free(cache, free) & (_held(cache) == 0)
  page = cache.page_size
  stored = _stored_lengths(cache)
  needed = -(-(stored + jnp.maximum(num_new, 0)) // page)  # [B]
  slots = jnp.arange(cache.page_table.shape[1], dtype=jnp.int32)
  wanted = (slots[None, :] < needed[:, None]) & ~_in_pool(cache, cache.page_table)
  wanted = wanted.reshape(-1)
  order = jnp.cumsum(wanted, dtype=jnp.int32) - 1  # the n-th page asked for
  free_pages = jnp.nonzero(free, size=free.shape[0], fill_value=-1)[0]
  free_pages = free_pages.astype(jnp.int32)
  available = jnp.sum(free, dtype=jnp.int32)
  granted = jnp.where(order < available, free_pages[jnp.clip(order, 0)], -1)
  table = jnp.where(wanted, granted, cache.page_table.reshape(-1))
  taken_index = jnp.where(wanted & (granted >= 0), granted, cache.num_pages)
  taken = jnp.zeros_like(free).at[taken_index].set(True, mode='drop')
  cache = dataclasses.replace(cache, page_table=table.reshape(cache.page_table.shape))
  return cache, free & ~taken


def release(cache, done, free=None):
  """Sequences ``done [B]`` (bool) emptied for reuse: lengths 0 and, paged,
  page-table entries -1. Returns the cache; paged, ``(cache, free)``: ``free
  [P]`` with the pages that no table holds any more marked free (a page
  another table still holds stays taken)."""
  _check_layout(cache)
  done = jnp.asarray(done)
  if done.dtype != jnp.bool_:
    raise TypeError(f'`done` must be boolean [B]; got {done.dtype}.')
  _checks.check_shape(done, 'done', cache.lengths.shape, '[B]')
  cache = dataclasses.replace(cache, lengths=jnp.where(done, 0, cache.lengths))
  return cache._release(done, free)


def _positions(cache, num_new, q_len: int):
  """``(positions [B, T] of the new tokens, real [B, T])``: row t of a
  sequence is real when ``t < num_new`` (default all)."""
  new = _new_count(cache, num_new, q_len)
  steps = jnp.arange(q_len, dtype=jnp.int32)
  start = _stored_lengths(cache)
  return start[:, None] + steps[None, :], steps[None, :] < new[:, None]


def write(cache, key, value, num_new=None):
  """The cache with ``key [B, T, K, D]``, ``value [B, T, K, V]`` stored at
  each sequence's next positions (the first ``num_new [B]`` of the T rows;
  default all), and ``lengths`` advanced by the tokens stored: up to the
  first that has no place of the sequence's own (module docstring)."""
  _check_layout(cache)
  positions, real = _positions(cache, num_new, key.shape[1])
  own, places = cache._places(positions)
  storable = real & (positions < cache.capacity) & own
  stored = jnp.cumprod(storable, axis=1, dtype=jnp.int32).astype(bool)  # a prefix
  lengths = _stored_lengths(cache) + stored.sum(axis=1, dtype=jnp.int32)
  return cache._store(key, value, positions, places, stored, lengths)


# Options a cache step sets itself, and why.
_SET_BY_THE_CACHE = {
  'is_causal': 'a cache step is causal by construction',
  'q_offsets': "the new tokens sit at each sequence's length",
  'query_seq_lengths': '`num_new` says which rows are real',
  'kv_offsets': 'cached keys sit at positions 0..capacity-1',
  'key_value_seq_lengths': "the cache's lengths say which keys are stored",
  'return_residual': 'a step returns its output and the cache',
}
# Options a paged cache cannot take: arrays along the keys ([..., S]).
_PER_KEY = ('bias', 'mask', 'q_segment_ids', 'kv_segment_ids')


def _check_options(cache, options) -> dict:
  """The step's own attention options, with a block mask's ``mask_mod``."""
  for name, why in _SET_BY_THE_CACHE.items():
    if name in options:
      raise TypeError(f'a cache step takes no `{name}`: {why}.')
  if not cache.takes_per_key_arrays:
    given = [name for name in _PER_KEY if options.get(name) is not None]
    if given:
      raise TypeError(
        f'a paged cache step takes no per-key array ({", ".join(given)}): its '
        'keys lie in pages. Use a dense cache, or a `mask_mod`/`score_mod`.'
      )
  block_mask = options.pop('block_mask', None)
  if block_mask is not None:
    # A block mask's states describe a whole call's blocks at positions 0..;
    # a step reads other rows at other positions, so it tests its mod per
    # element: the same mask, without the skipping.
    if not isinstance(block_mask, BlockMask):
      raise TypeError(
        f'`block_mask` must be a jattn.BlockMask; got {type(block_mask).__name__}.'
      )
    if options.get('mask_mod') not in (None, block_mask.mask_mod):
      raise ValueError('pass `mask_mod` or `block_mask`, not both.')
    options['mask_mod'] = block_mask.mask_mod
  return options


def attend(query, cache, start, num_new=None, **options):
  """``query [B, T, H, D]`` at positions ``start + i`` against everything
  in ``cache`` (already written), causally: ``[B, T, H, V]``. Rows past
  ``num_new`` are zero. Paged caches are read a few pages at a time, merged
  by log-sum-exp."""
  _check_layout(cache)
  options = _check_options(cache, dict(options))
  new = _new_count(cache, num_new, query.shape[1])
  start = jnp.asarray(start)
  _checks.check_integer(start, 'start')
  options = dict(
    options, is_causal=True, q_offsets=start.astype(jnp.int32), query_seq_lengths=new
  )
  return cache._read(query, options)


# Keys a paged cache's attention gathers per step (whole pages, at least one).
KEYS_PER_STEP = 1024


def _paged_attention(query, cache: PagedKVCache, options):
  """Attention over a paged cache, a few pages at a time (``KEYS_PER_STEP``
  keys, gathered from the pool), merged by log-sum-exp."""
  sinks = options.pop('sinks', None)
  page, max_pages = cache.page_size, cache.page_table.shape[1]
  per_step = max(1, min(max_pages, KEYS_PER_STEP // page))
  while max_pages % per_step:
    per_step -= 1
  span = per_step * page  # keys per step
  stored = _stored_lengths(cache)  # [B]: never past the first hole

  def some_pages(carry, index):
    pages = jax.lax.dynamic_slice_in_dim(
      cache.page_table, index * per_step, per_step, 1
    )
    seen = jnp.clip(stored - index * span, 0, span)
    pages = jnp.where(_in_pool(cache, pages), pages, 0)  # past `seen` if not

    def gather(pool):  # [B, K, span, X], float32: one rounding, at the end
      some = jnp.moveaxis(pool[pages], 2, 1)  # [B, K, pages, page, X]
      return some.reshape(some.shape[:2] + (span, -1)).astype(jnp.float32)

    out, lse = attention_of_stored(
      query.astype(jnp.float32),
      gather(cache.key_pages),
      gather(cache.value_pages),
      kv_offsets=jnp.full_like(stored, index * span),
      key_value_seq_lengths=seen,
      return_residual=True,
      **options,
    )
    total = jnp.where(lse > -jnp.inf, 1.0, 0.0)
    return _numerics.merge(carry, (out, lse, total)), None

  shape = query.shape[:-1]
  value_dim = cache.value_pages.shape[-1]
  init = _numerics.start(shape, value_dim, _numerics.sink_logits(sinks))
  steps = jnp.arange(max_pages // per_step, dtype=jnp.int32)
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
  chunk, soft-cap, ``mask_mod``, ``score_mod``, a ``block_mask``'s mod, ...;
  not the ones the cache sets: ``is_causal``, offsets, lengths). With
  ``params['sinks']`` the sinks join each row. Rows past ``num_new`` return
  zeros. Tokens without a place of their own are dropped (module
  docstring); eagerly, bad ``num_new`` or lengths raise.
  """
  _check_layout(cache)
  query, key, value, dtype = _params.projections(params, inputs_q, None, None, dtype)
  _check_cache(cache, key, value)
  if _concrete(cache.lengths):
    check_cache(cache)
  start = _stored_lengths(cache)
  cache = write(cache, key, value, num_new)
  if 'sinks' in params:
    attention_kwargs = dict(attention_kwargs, sinks=params['sinks'])
  encoded = attend(query, cache, start, num_new, **attention_kwargs)
  return _params.project(encoded, params['out'], '...thv,hvf->...tf', dtype), cache


def _check_cache(cache, key, value) -> None:
  """The cache holds these heads, dims and batch."""
  keys, values = cache.head_dims()
  if keys != key.shape[2:] or values != value.shape[2:]:
    raise ValueError(
      f'the cache holds keys of (K, D) = {keys} and values of (K, V) = '
      f'{values}; the parameters make {tuple(key.shape[2:])} and '
      f'{tuple(value.shape[2:])}.'
    )
  if cache.dtype != key.dtype:
    raise ValueError(
      f'the cache holds {cache.dtype}; this step computes in {key.dtype}: '
      'init the cache with dtype= the compute dtype (or pass dtype= here).'
    )
  if cache.lengths.shape != key.shape[:1]:
    raise ValueError(
      f'the cache is for B={cache.lengths.shape[0]} sequences; the inputs have '
      f'B={key.shape[0]} (shape {tuple(key.shape)}).'
    )
