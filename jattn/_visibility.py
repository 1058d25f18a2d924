"""Who may attend: one value that every kernel asks, and none re-derives.

A local query row ``i`` is row ``r = q_start + i`` of the whole sequence
(``q_start`` is non-zero for a ring step), at position ``p = q_offset + r``
(``q_offset`` is the caller's per-sequence offset, the position of row 0);
likewise key column ``j`` is column ``c = kv_start + j`` at position
``p' = kv_offset + c``. Row r may see column c when every one of these holds:

  causal (top-left)   p' <= p, or p' < prefix_length (prefix-LM)
  window (l, r)       p - left <= p' <= p + right
  chunk C             p // C == p' // C
  lengths             r < q_len and c < kv_len (counts, from row/column 0)
  real keys           c < kv_size, and local column j < kv_extent (hide the
                      padding of a ring and of a kernel's blocks)
  segments            q_seg[r] == kv_seg[c]
  dense mask          mask[r, c]

``elements`` answers for any block of rows and columns; ``kv_blocks`` says
which key blocks a query block sees, split into *partial* blocks (test each
element) and *full* blocks (every element visible, no test); ``q_blocks`` is
the transpose for the backward. Each rule gives an interval of columns (or
rows) seen by some element of the block and one seen by all; the position
rules by arithmetic, segment ids by the blocks' min and max ids (correct for
unsorted ids), a dense mask by its blocks' any and all.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jattn import masks

# Stands for an unbounded position (well inside int32).
_FAR = 2**29

_DATA = (
  'q_len',
  'kv_len',
  'prefix',
  'q_seg',
  'kv_seg',
  'mask',
  'q_offset',
  'kv_offset',
  'q_start',
  'kv_start',
)
_META = ('is_causal', 'window', 'chunk_size', 'kv_size', 'kv_extent')


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META
)
@dataclasses.dataclass(frozen=True)
class Visibility:
  """Static rules and per-sequence arrays (one head inside ``map_heads``).

  Outside ``map_heads`` the arrays carry a batch axis: lengths, prefix and
  offsets ``[B]``, ``q_seg [B, T]``, ``kv_seg [B, S]``, ``mask [B|1, H|1,
  T|1, S|1]``. Inside, ``mask`` is ``[T|1, S|1]``. ``q_start``/``kv_start``
  are scalars shared by the batch. None stands for 0 (offsets, starts).
  """

  is_causal: bool = False
  window: tuple[int, int] | None = None
  chunk_size: int | None = None
  kv_size: int | None = None
  kv_extent: int | None = None
  q_len: jax.Array | None = None
  kv_len: jax.Array | None = None
  prefix: jax.Array | None = None
  q_seg: jax.Array | None = None
  kv_seg: jax.Array | None = None
  mask: jax.Array | None = None
  q_offset: jax.Array | None = None
  kv_offset: jax.Array | None = None
  q_start: jax.Array | None = None
  kv_start: jax.Array | None = None

  replace = dataclasses.replace

  @property
  def _q_first(self):
    """Row of the sequence that local row 0 is."""
    return 0 if self.q_start is None else self.q_start

  @property
  def _kv_first(self):
    return 0 if self.kv_start is None else self.kv_start

  @property
  def _q_shift(self):
    """Position minus row."""
    return 0 if self.q_offset is None else self.q_offset

  @property
  def _kv_shift(self):
    return 0 if self.kv_offset is None else self.kv_offset

  def indices(self, r0, c0, rows: int, cols: int):
    """Rows ``[rows]`` and columns ``[cols]`` of the sequence that a block at
    local ``(r0, c0)`` covers."""
    return (
      self._q_first + r0 + jnp.arange(rows),
      self._kv_first + c0 + jnp.arange(cols),
    )

  def elements(self, r0, c0, rows: int, cols: int):
    """``[rows, cols]`` bool for the block at local ``(r0, c0)``; None when
    everything is visible (callers skip the select)."""
    q_idx, kv_idx = self.indices(r0, c0, rows, cols)
    q_pos, kv_pos = q_idx + self._q_shift, kv_idx + self._kv_shift
    conditions = []
    if self.is_causal:
      causal = masks.causal_from_positions(q_pos, kv_pos)
      if self.prefix is not None:
        causal = causal | (kv_pos < self.prefix)[None, :]
      conditions.append(causal)
    if self.window is not None:
      conditions.append(masks.window_from_positions(q_pos, kv_pos, self.window))
    if self.chunk_size is not None:
      conditions.append(masks.chunk_from_positions(q_pos, kv_pos, self.chunk_size))
    if self.q_len is not None:
      conditions.append((q_idx < self.q_len)[:, None])
    if self.kv_len is not None:
      conditions.append((kv_idx < self.kv_len)[None, :])
    if self.kv_size is not None:
      conditions.append((kv_idx < self.kv_size)[None, :])
    if self.kv_extent is not None:
      conditions.append((c0 + jnp.arange(cols) < self.kv_extent)[None, :])
    if self.q_seg is not None:
      q_seg = lax.dynamic_slice_in_dim(self.q_seg, r0, rows)
      kv_seg = lax.dynamic_slice_in_dim(self.kv_seg, c0, cols)
      conditions.append(q_seg[:, None] == kv_seg[None, :])
    if self.mask is not None:
      conditions.append(logits_block(self.mask, r0, c0, rows, cols))
    return masks.combine_masks(*conditions)

  def rows_with_keys(self, q_size: int, kv_size: int):
    """``[T]`` bool: the rows that see at least one key."""
    visible = self.elements(0, 0, q_size, kv_size)
    if visible is None:
      return jnp.ones((q_size,), bool)
    return jnp.broadcast_to(visible, (q_size, kv_size)).any(axis=-1)

  @property
  def _key_limits(self):
    """Bounds on visible columns: lengths, real keys, local extent."""
    extent = None if self.kv_extent is None else self._kv_first + self.kv_extent
    return [x for x in (self.kv_len, self.kv_size, extent) if x is not None]

  def pad(self, rows: int, cols: int, kv_extent: int) -> Visibility:
    """Padded to ``rows`` x ``cols`` local rows and columns (a kernel's whole
    blocks) from ``kv_extent`` real columns: segment ids and mask padded,
    padded columns hidden."""
    extent = self.kv_extent if cols == kv_extent else kv_extent
    return self.replace(
      q_seg=pad_axis(self.q_seg, 0, rows),
      kv_seg=pad_axis(self.kv_seg, 0, cols),
      mask=pad_logits(self.mask, rows, cols),
      kv_extent=extent,
    )

  # -- block ranges: each rule gives an interval of visible positions and an
  # interval of positions visible to the whole block; they intersect.

  def kv_blocks(self, i, bq: int, bk: int, num_blocks: int):
    """Key blocks of query block ``i``: ``(lo, full_lo, full_hi, hi)``.

    ``[lo, hi)`` may hold visible elements; within it ``[full_lo, full_hi)``
    are visible throughout; the rest are partial.
    """
    first = self._q_first + i * bq  # rows first..last of the sequence
    last = first + bq - 1
    # Position rules, in positions, shifted to columns.
    p_first, p_last = first + self._q_shift, last + self._q_shift
    by_position = []  # (columns seen by some row, columns seen by every row)
    if self.is_causal:
      prefix_end = -_FAR if self.prefix is None else self.prefix - 1
      by_position.append(
        (
          (-_FAR, jnp.maximum(p_last, prefix_end)),
          (-_FAR, jnp.maximum(p_first, prefix_end)),
        )
      )
    if self.window is not None:
      by_position.append(_band(p_first, p_last, *self.window))
    if self.chunk_size is not None:
      by_position.append(_chunk(p_first, p_last, self.chunk_size))
    rules = [_shift(rule, -self._kv_shift) for rule in by_position]
    rules += [_below(limit) for limit in self._key_limits]
    if self.q_len is not None:
      rules.append(_all_if(first < self.q_len, last < self.q_len))
    if self.q_seg is not None:
      flags = _segment_blocks(self.q_seg, i, bq, self.kv_seg, bk, num_blocks)
      rules.append(_from_blocks(*flags, self._kv_first, bk))
    if self.mask is not None:
      flags = _mask_blocks(self.mask, i, bq, bk, num_blocks)
      rules.append(_from_blocks(*flags, self._kv_first, bk))
    return _block_range(rules, self._kv_first, bk, num_blocks)

  def q_blocks(self, j, bq: int, bk: int, num_blocks: int):
    """Query blocks that see key block ``j``: ``(lo, full_lo, full_hi, hi)``."""
    first = self._kv_first + j * bk  # columns first..last of the sequence
    last = first + bk - 1
    p_first, p_last = first + self._kv_shift, last + self._kv_shift
    by_position = []  # (rows that see some column, rows that see every column)
    if self.is_causal:
      prefix = -_FAR if self.prefix is None else self.prefix
      by_position.append(
        (
          (jnp.where(p_first < prefix, -_FAR, p_first), _FAR),
          (jnp.where(p_last < prefix, -_FAR, p_last), _FAR),
        )
      )
    if self.window is not None:
      by_position.append(_band(p_first, p_last, *reversed(self.window)))
    if self.chunk_size is not None:
      by_position.append(_chunk(p_first, p_last, self.chunk_size))
    rules = [_shift(rule, -self._q_shift) for rule in by_position]
    if self.q_len is not None:
      rules.append(_below(self.q_len))
    rules += [_all_if(first < limit, last < limit) for limit in self._key_limits]
    if self.q_seg is not None:
      flags = _segment_blocks(self.kv_seg, j, bk, self.q_seg, bq, num_blocks)
      rules.append(_from_blocks(*flags, self._q_first, bq))
    if self.mask is not None:
      flags = _mask_blocks(self.mask.T, j, bk, bq, num_blocks)
      rules.append(_from_blocks(*flags, self._q_first, bq))
    return _block_range(rules, self._q_first, bq, num_blocks)


def _shift(rule, by):
  """A rule's intervals moved by ``by`` (positions to rows or columns); the
  far ends stay far enough for offsets well inside ``_FAR``."""
  return tuple((low + by, high + by) for low, high in rule)


def _band(first, last, before: int, after: int):
  """A window: position p sees ``p - before .. p + after``."""
  before, after = min(before, _FAR), min(after, _FAR)
  return (first - before, last + after), (last - before, first + after)


def _chunk(first, last, size: int):
  """A chunk: the same chunk as the position (symmetric in rows and columns)."""
  start = first // size * size
  seen = (start, last // size * size + size - 1)
  return seen, _where(first // size == last // size, (start, start + size - 1))


def _below(limit):
  """Positions below ``limit``."""
  return (-_FAR, limit - 1), (-_FAR, limit - 1)


def _all_if(some, every):
  """Everything, when ``some`` (or ``every``) position of the block counts."""
  return _where(some, (-_FAR, _FAR)), _where(every, (-_FAR, _FAR))


def _where(condition, interval):
  """``interval`` where ``condition`` holds, else the empty interval."""
  low, high = interval
  return jnp.where(condition, low, _FAR), jnp.where(condition, high, -_FAR)


def _whole_blocks(x, axis: int, size: int):
  """``x`` padded along ``axis`` to whole blocks of ``size``."""
  return pad_axis(x, axis, -(-x.shape[axis] // size) * size)


def _segment_blocks(own, index, own_size: int, other, size: int, count: int):
  """Block ``index`` of the ids ``own`` against the ``count`` blocks of the
  ids ``other``: ``[count]`` flags (some id in common could be; every id is
  one and the same). Padding (id 0) only widens "some" and breaks "every"."""
  block = lax.dynamic_slice_in_dim(
    _whole_blocks(own, 0, own_size), index * own_size, own_size
  )
  ids = _whole_blocks(other, 0, size)[: count * size].reshape(count, size)
  low, high = ids.min(axis=1), ids.max(axis=1)
  own_low, own_high = block.min(), block.max()
  some = (low <= own_high) & (high >= own_low)
  every = (low == high) & (own_low == own_high) & (low == own_low)
  return some, every


def _mask_blocks(mask, index, own_size: int, size: int, count: int):
  """Rows ``index * own_size ...`` of a ``[rows|1, cols|1]`` mask against its
  ``count`` column blocks: ``[count]`` flags (any visible; all visible)."""
  if mask.shape[0] != 1:
    mask = lax.dynamic_slice_in_dim(
      _whole_blocks(mask, 0, own_size), index * own_size, own_size
    )
  if mask.shape[1] == 1:
    return jnp.broadcast_to(mask.any(), (count,)), jnp.broadcast_to(
      mask.all(), (count,)
    )
  blocks = _whole_blocks(mask, 1, size)[:, : count * size]
  blocks = blocks.reshape(mask.shape[0], count, size)
  return blocks.any(axis=(0, 2)), blocks.all(axis=(0, 2))


def _from_blocks(some, every, start, size: int):
  """Block flags -> a rule: columns from the first to the last block with
  ``some``; full, the run of ``every`` blocks from the first one."""
  count = some.shape[0]
  index = jnp.arange(count)
  first = jnp.min(jnp.where(some, index, count))
  last = jnp.max(jnp.where(some, index, -1))
  full_first = jnp.min(jnp.where(every, index, count))
  full_end = jnp.min(jnp.where((index > full_first) & ~every, index, count))
  seen = (start + first * size, start + (last + 1) * size - 1)
  return seen, (start + full_first * size, start + full_end * size - 1)


def _block_range(rules, start, size: int, count: int):
  """``(seen, full)`` intervals of each rule (rows or columns of the
  sequence) -> their intersection as ``(lo, full_lo, full_hi, hi)`` block
  indices."""
  seen = [interval for interval, _ in rules]
  full = [interval for _, interval in rules]
  low = functools.reduce(jnp.maximum, [lo for lo, _ in seen], -_FAR)
  high = functools.reduce(jnp.minimum, [hi for _, hi in seen], _FAR)
  lo = jnp.clip((low - start) // size, 0, count)
  hi = jnp.clip((high - start) // size + 1, lo, count)
  full_low = functools.reduce(jnp.maximum, [lo for lo, _ in full], -_FAR)
  full_high = functools.reduce(jnp.minimum, [hi for _, hi in full], _FAR)
  full_lo = jnp.clip(-((start - full_low) // size), lo, hi)
  full_hi = jnp.clip((full_high - start + 1) // size, full_lo, hi)
  return lo, full_lo, full_hi, hi


def pad_axis(x, axis: int, size: int):
  """``x`` padded with zeros (False) along ``axis`` up to ``size``; None stays None."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def pad_logits(x, rows: int, cols: int):
  """A ``[T|1, S|1]`` bias or mask padded to ``[rows|1, cols|1]`` (a
  broadcast dim of 1 stays 1); None stays None."""
  if x is None:
    return None
  x = x if x.shape[0] == 1 else pad_axis(x, 0, rows)
  return x if x.shape[1] == 1 else pad_axis(x, 1, cols)


def logits_block(x, r0, c0, rows: int, cols: int):
  """The ``[rows|1, cols|1]`` block of a ``[T|1, S|1]`` bias or mask at
  ``(r0, c0)`` (a broadcast dim of 1 stays 1); None stays None."""
  if x is None:
    return None
  t, s = x.shape
  return lax.dynamic_slice(
    x,
    (r0 if t > 1 else 0, c0 if s > 1 else 0),
    (rows if t > 1 else 1, cols if s > 1 else 1),
  )
