"""Who may attend: one value that every kernel asks, and none re-derives.

A local query row ``i`` is row ``r = q_start + i`` of the whole sequence
(``q_start`` is non-zero for a ring step), at position ``p = q_offsets + r``
(``q_offsets`` is the caller's per-sequence offset, the position of row 0);
likewise key column ``j`` is column ``c = kv_start + j`` at position
``p' = kv_offsets + c``. Row r may see column c when every one of these holds:

  causal (top-left)   p' <= p, or p' < prefix_lengths (prefix-LM)
  window (l, r)       p - left <= p' <= p + right
  chunk C             p // C == p' // C
  lengths             r < query_seq_lengths and c < key_value_seq_lengths
                      (counts, from row/column 0)
  real keys           c < kv_size, and local column j < kv_extent (hide the
                      padding of a ring and of a kernel's blocks)
  segments            q_segment_ids[r] == kv_segment_ids[c]
  dense mask          mask[r, c]
  mask_mod            mask_mod(b, h, p, p') (the user's function, ``_mods``)

Each rule is said once. The static rules (causal, window, chunk: options of
the call) and every array (``ARRAYS``: its public keyword, axis kind, layout
and rule) are declared here and nowhere else. The *interval* rules give, for
a run of rows ``first..last``, the columns some row sees and the columns
every row sees, both intervals; with ``first == last`` that is the row's
exact visible interval, which is the element test. The other rules give an
element test and per-block flags (segment ids by the blocks' min and max
ids, correct for unsorted ids; a dense mask by its blocks' any and all; a
``mask_mod`` by the states of its block mask, ``jattn.create_block_mask``,
looked up by position, so a block mask serves any block size, offsets, ring
steps and decode steps; else every block it touches is partial). A mod is
handed positions of real rows and columns only: padded ones are clamped to
the last real one.
``block_states`` classifies every (query block, key block) pair as hidden,
partial (test each element) or full (no test) from all of them, for one row
of the batch and one head (``block_plan``: the visit lists): skipping
follows each sequence's own layout.

From an array's kind follow ``map_heads``' axes, the kernels' padding, the
ring's chunking and mesh specs, whether the rows or heads may differ, the
public keyword's checks (``_prepare``) and the xla kernel's refusal.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn._types import FULL, HIDDEN, OPTION_NAMES, PARTIAL

# Stands for an unbounded position (well inside int32).
_FAR = 2**29

# Every array of the value, declared once: its axis kind outside ``map_heads``
# (after the flat batch axis B), and for the per-sequence arrays a user passes
# their public layout (the name is the public keyword):
#   sequence  [B]                    one value per sequence
#   heads     [H]                    one value per query head
#   rows      [B, T]                 one per query row
#   cols      [B, S]                 one per key column (travels with the keys)
#   logits    [B|1, H|1, T|1, S|1]   broadcast like the logits
#   blocks    [B|1, H|1, nq, nk]     per block of a block mask (its own grid)
#   step      scalar                 shared by the batch (a ring step's starts)
#   shared    any pytree             the same everywhere (a mod's arrays)
# Inside ``map_heads`` each is one head's: a scalar, [T], [S], [T|1, S|1] or
# [nq, nk]. From the kind follow ``map_heads``' axes, the kernels' padding,
# the ring's chunking and mesh specs, and whether a rule depends on the head.


@dataclasses.dataclass(frozen=True)
class Array:
  """An array of the visibility value, and the rule it states (if any).

  ``kind``: its axis kind; ``layout``: the public layout of one a user
  passes (by its keyword; None: the call sets it); ``what``: its name in
  messages. The rule, as functions of the (one head's) value:
  ``interval(vis, first, last)`` -> ``(seen, full)``, the columns that some
  and every row of ``first..last`` may see (``Visibility._intervals``);
  or, for a rule that is not an interval, ``elements(vis, r0, c0, rows,
  cols)`` -> ``[rows|1, cols|1]`` bool and ``blocks(vis, bq, bk, nq, nk)`` ->
  ``(some, every)`` ``[nq|1, nk|1]`` flags (some element of the block may
  be visible; every one is).
  """

  kind: str
  layout: str | None = None
  what: str | None = None
  interval: Callable | None = None
  elements: Callable | None = None
  blocks: Callable | None = None


def _query_lengths(vis, first, last):
  """Rows past the query length see nothing."""
  lengths = vis.query_seq_lengths
  return _all_if(first < lengths, last < lengths)


def _key_lengths(vis, first, last):
  """Columns past the key length are hidden."""
  return _below(vis.key_value_seq_lengths)


def _segment_elements(vis, r0, c0, rows: int, cols: int):
  q_seg = lax.dynamic_slice_in_dim(vis.q_segment_ids, r0, rows)
  kv_seg = lax.dynamic_slice_in_dim(vis.kv_segment_ids, c0, cols)
  return q_seg[:, None] == kv_seg[None, :]


def _mask_elements(vis, r0, c0, rows: int, cols: int):
  return logits_block(vis.mask, r0, c0, rows, cols)


def _mod_elements(vis, r0, c0, rows: int, cols: int):
  return vis.mask_mod.on_block(*vis.mod_indices(r0, c0, rows, cols))


def _mod_block_flags(vis, bq: int, bk: int, nq: int, nk: int):
  """From the states of the mod's block mask, at the positions each local
  block covers (``_covered``): hidden (full) when every block of the mask
  it overlaps is; partial where the mask does not reach. Without a block
  mask every block the mod applies to is partial."""
  if vis.mod_blocks is None:
    return True, False
  size_q, size_kv, mask_bq, mask_bk = vis.mod_grid
  q_first = vis._q_first + jnp.arange(nq, dtype=jnp.int32) * bq
  kv_first = vis._kv_first + jnp.arange(nk, dtype=jnp.int32) * bk
  q_last = (
    q_first + bq - 1
    if vis.q_size is None
    else jnp.minimum(q_first + bq - 1, vis.q_size - 1)
  )
  kv_last = (
    kv_first + bk - 1
    if vis.kv_size is None
    else jnp.minimum(kv_first + bk - 1, vis.kv_size - 1)
  )
  rows, row_in, row_known = _covered(
    q_first + vis._q_shift, q_last + vis._q_shift, bq, mask_bq, size_q
  )
  cols, col_in, col_known = _covered(
    kv_first + vis._kv_shift, kv_last + vis._kv_shift, bk, mask_bk, size_kv
  )
  cells = vis.mod_blocks[rows[:, None, :, None], cols[None, :, None, :]]
  inside = row_in[:, None, :, None] & col_in[None, :, None, :]
  known = row_known[:, None] & col_known[None, :]  # [nq, nk]
  hidden = jnp.all((cells == HIDDEN) | ~inside, axis=(2, 3)) & known
  full = jnp.all((cells == FULL) | ~inside, axis=(2, 3)) & known
  return ~hidden, full


def _covered(first, last, size: int, mask_size: int, extent: int):
  """The blocks of ``mask_size`` (of a mask over positions ``0..extent-1``)
  that runs of positions ``first..last`` ``[n]`` (local blocks of ``size``)
  overlap: ``(index [n, span], overlapped [n, span], known [n])``; a run
  reaching outside the mask is not known."""
  span = -(-size // mask_size) + 1  # a misaligned run overlaps one more
  start = jnp.floor_divide(first, mask_size)
  index = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None]
  overlapped = index <= jnp.floor_divide(last, mask_size)[:, None]
  known = (first >= 0) & (last < extent)
  return jnp.clip(index, 0, -(-extent // mask_size) - 1), overlapped, known


ARRAYS = {
  'query_seq_lengths': Array('sequence', '[B...]', interval=_query_lengths),
  'key_value_seq_lengths': Array('sequence', '[B...]', interval=_key_lengths),
  'prefix_lengths': Array('sequence', '[B...]'),  # part of the causal rule
  'q_offsets': Array('sequence', '[B...]'),
  'kv_offsets': Array('sequence', '[B...]'),
  'q_segment_ids': Array(
    'rows',
    '[B..., T]',
    elements=_segment_elements,
    blocks=lambda vis, bq, bk, nq, nk: _segment_blocks(
      vis.q_segment_ids, bq, vis.kv_segment_ids, bk
    ),
  ),
  'kv_segment_ids': Array('cols', '[B..., S]'),
  'batch_index': Array('sequence'),
  'head_index': Array('heads'),
  'mask': Array(
    'logits',
    what='mask',
    elements=_mask_elements,
    blocks=lambda vis, bq, bk, nq, nk: _mask_blocks(vis.mask, bq, bk),
  ),
  'mod_blocks': Array('blocks', what='block_mask'),
  'mask_mod': Array(
    'shared', what='mask_mod', elements=_mod_elements, blocks=_mod_block_flags
  ),
  'q_start': Array('step', what='sequence chunks'),
  'kv_start': Array('step', what='sequence chunks'),
}


# The public names of the value's fields and the call's options, for a
# kernel's refusals (the rest are named as they are).
_PUBLIC_NAMES = {
  **{name: array.what for name, array in ARRAYS.items() if array.what},
  **OPTION_NAMES,
  'kv_extent': 'padded keys',
  'mod_grid': 'block_mask',
}


def refused(given: list[str], allowed: set[str]) -> list[str]:
  """The public names of the ``given`` fields (``Visibility.given``,
  ``options_given``) that a kernel has not ``allowed``, once each."""
  names = [_PUBLIC_NAMES.get(name, name) for name in given if name not in allowed]
  return list(dict.fromkeys(names))


def sequence_arrays() -> tuple[str, ...]:
  """The per-sequence arrays a user passes, by public keyword."""
  return tuple(name for name, array in ARRAYS.items() if array.layout)


# The static rules: fields of the call's ``Options`` (public keywords in
# ``_types.OPTION_NAMES``), and the value's other static fields.
STATIC_RULES = ('is_causal', 'window', 'chunk_size')
_META = (*STATIC_RULES, 'q_size', 'kv_size', 'kv_extent', 'mod_grid')


@jax.tree_util.register_pytree_node_class
class Visibility:
  """Static rules and the arrays of ``ARRAYS``, each by its name (an unset
  one reads None; offsets and starts then 0). ``batch_index``/``head_index``
  are the global batch row and query head (what a kernel hands a mod);
  ``q_size``/``kv_size`` the rows and columns of the whole sequence;
  ``mask_mod`` a ``_mods.Mod``, ``mod_blocks`` the states of its block mask
  and ``mod_grid`` what they cover: ``(T, S, bq, bk)``.
  A pytree: the set arrays are its leaves."""

  def __init__(
    self,
    *,
    is_causal: bool = False,
    window: tuple[int, int] | None = None,
    chunk_size: int | None = None,
    q_size: int | None = None,
    kv_size: int | None = None,
    kv_extent: int | None = None,
    mod_grid: tuple[int, int, int, int] | None = None,
    **arrays,
  ):
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
      raise TypeError(f'Visibility has no array {unknown}; ARRAYS declares them.')
    self.is_causal, self.window, self.chunk_size = is_causal, window, chunk_size
    self.q_size, self.kv_size, self.kv_extent = q_size, kv_size, kv_extent
    self.mod_grid = mod_grid
    self.arrays = arrays  # None: unset (a pytree with no leaves)

  def __getattr__(self, name):
    if name in ARRAYS:  # only reached for arrays (statics are attributes)
      return self.__dict__['arrays'].get(name)
    raise AttributeError(f'Visibility has no attribute {name!r}')

  def tree_flatten(self):
    return (self.arrays,), tuple(getattr(self, name) for name in _META)

  @classmethod
  def tree_unflatten(cls, statics, children):
    return cls(**dict(zip(_META, statics, strict=True)), **children[0])

  def replace(self, **changes) -> Visibility:
    """A copy with ``changes`` (an array set to None is unset)."""
    statics = {name: getattr(self, name) for name in _META}
    return Visibility(**{**statics, **self.arrays, **changes})

  @property
  def set_arrays(self) -> dict:
    """The arrays that are set, by name."""
    return {n: x for n, x in self.arrays.items() if x is not None}

  def given(self) -> list[str]:
    """The names of the static fields set away from their defaults and of
    the set arrays."""
    statics = [name for name in _META if getattr(self, name) not in (None, False)]
    return statics + [name for name in ARRAYS if name in self.set_arrays]

  def map_arrays(self, **by_kind) -> Visibility:
    """A copy with each set array of a kind in ``by_kind`` replaced by
    ``by_kind[kind](array)``."""
    return self.replace(
      **{
        name: by_kind[ARRAYS[name].kind](x)
        for name, x in self.set_arrays.items()
        if ARRAYS[name].kind in by_kind
      }
    )

  def arrays_of(self, kind: str) -> dict:
    """The set arrays of ``kind``, by name."""
    return {n: x for n, x in self.set_arrays.items() if ARRAYS[n].kind == kind}

  def _rules(self, part: str):
    """The set arrays' rule functions ``part`` ('interval', 'elements',
    'blocks'), in ``ARRAYS``' order."""
    given = self.set_arrays
    rules = (getattr(ARRAYS[name], part) for name in ARRAYS if name in given)
    return [rule for rule in rules if rule is not None]

  @property
  def differs_by_row(self) -> bool:
    """Whether the rows of the batch may see different blocks: a rule's
    array holds a value per sequence (the batch index itself changes
    nothing), or the mask has a batch axis."""
    kinds = ('sequence', 'rows', 'cols')
    by_array = any(
      ARRAYS[name].kind in kinds and name != 'batch_index' for name in self.set_arrays
    )
    by_logits = self.arrays_of('logits') | self.arrays_of('blocks')
    return by_array or any(x.shape[0] > 1 for x in by_logits.values())

  @property
  def blocks_differ_by_head(self) -> bool:
    """Whether the heads of a row may skip different blocks: a mask or
    block mask with a head axis (outside ``map_heads``)."""
    by_logits = self.arrays_of('logits') | self.arrays_of('blocks')
    return any(x.shape[1] > 1 for x in by_logits.values())

  @property
  def differs_by_head(self) -> bool:
    """Whether the heads of a row may see different keys: different blocks,
    or a mod that reads the head it is handed."""
    mods = self.arrays_of('shared').values()
    return self.blocks_differ_by_head or any(m.depends_on('h') for m in mods)

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
    return 0 if self.q_offsets is None else self.q_offsets

  @property
  def _kv_shift(self):
    return 0 if self.kv_offsets is None else self.kv_offsets

  def indices(self, r0, c0, rows: int, cols: int):
    """Rows ``[rows]`` and columns ``[cols]`` of the sequence that a block at
    local ``(r0, c0)`` covers."""
    return (
      self._q_first + r0 + jnp.arange(rows, dtype=jnp.int32),
      self._kv_first + c0 + jnp.arange(cols, dtype=jnp.int32),
    )

  def mod_indices(self, r0, c0, rows: int, cols: int):
    """``(b, h, q_idx [rows], kv_idx [cols])`` a mod is handed for the block
    at local ``(r0, c0)``: global positions, padded rows and columns clamped
    to the last real one."""
    q_idx, kv_idx = self.indices(r0, c0, rows, cols)
    if self.q_size is not None:
      q_idx = jnp.minimum(q_idx, self.q_size - 1)
    if self.kv_size is not None:
      kv_idx = jnp.minimum(kv_idx, self.kv_size - 1)
    q_idx, kv_idx = q_idx + self._q_shift, kv_idx + self._kv_shift
    return self.batch_index, self.head_index, q_idx, kv_idx

  def _intervals(self, first, last):
    """Columns of the sequence that rows ``first..last`` (scalars, or arrays
    for many runs at once) may see under the interval rules: ``(seen, full)``,
    each ``(low, high)``, inclusive; ``full`` is seen by every row. None
    without such rules."""
    p_first, p_last = first + self._q_shift, last + self._q_shift
    by_position = []
    if self.is_causal:
      prefix_end = -_FAR if self.prefix_lengths is None else self.prefix_lengths - 1
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
    extent = None if self.kv_extent is None else self._kv_first + self.kv_extent
    rules += [_below(limit) for limit in (self.kv_size, extent) if limit is not None]
    rules += [rule(self, first, last) for rule in self._rules('interval')]
    if not rules:
      return None
    shape = jnp.shape(first)

    def intersect(intervals):
      low = functools.reduce(jnp.maximum, [lo for lo, _ in intervals])
      high = functools.reduce(jnp.minimum, [hi for _, hi in intervals])
      return jnp.broadcast_to(low, shape), jnp.broadcast_to(high, shape)

    return intersect([s for s, _ in rules]), intersect([f for _, f in rules])

  def elements(self, r0, c0, rows: int, cols: int):
    """``[rows, cols]`` bool for the block at local ``(r0, c0)``; None when
    everything is visible (callers skip the select)."""
    q_idx, kv_idx = self.indices(r0, c0, rows, cols)
    conditions = []
    intervals = self._intervals(q_idx, q_idx)
    if intervals is not None:
      (low, high), _ = intervals
      conditions.append(
        (kv_idx[None, :] >= low[:, None]) & (kv_idx[None, :] <= high[:, None])
      )
    conditions += [rule(self, r0, c0, rows, cols) for rule in self._rules('elements')]
    return functools.reduce(jnp.logical_and, conditions) if conditions else None

  def rows_with_keys(self, q_size: int, kv_size: int):
    """``[T]`` bool: the rows that see at least one key."""
    visible = self.elements(0, 0, q_size, kv_size)
    if visible is None:
      return jnp.ones((q_size,), bool)
    return jnp.broadcast_to(visible, (q_size, kv_size)).any(axis=-1)

  def pad(self, rows: int, cols: int, kv_extent: int) -> Visibility:
    """Padded to ``rows`` x ``cols`` local rows and columns (a kernel's whole
    blocks) from ``kv_extent`` real columns: padded columns hidden."""
    extent = self.kv_extent if cols == kv_extent else kv_extent
    return self.map_arrays(
      rows=lambda x: pad_axis(x, 0, rows),
      cols=lambda x: pad_axis(x, 0, cols),
      logits=lambda x: pad_logits(x, rows, cols),
    ).replace(kv_extent=extent)

  def block_states(self, bq: int, bk: int, nq: int, nk: int):
    """``[nq, nk]`` int32: each (query block, key block) pair of local rows
    ``i·bq ...`` and columns ``j·bk ...`` is ``HIDDEN`` (no visible element),
    ``FULL`` (every element visible) or ``PARTIAL``. Arrays must cover the
    ``nq·bq`` rows and ``nk·bk`` columns (``pad``)."""
    first = self._q_first + jnp.arange(nq, dtype=jnp.int32) * bq
    col_first = (self._kv_first + jnp.arange(nk, dtype=jnp.int32) * bk)[None, :]
    col_last = col_first + bk - 1
    some = every = jnp.ones((nq, nk), bool)
    intervals = self._intervals(first, first + bq - 1)
    if intervals is not None:
      (low, high), (full_low, full_high) = intervals
      some = (col_last >= low[:, None]) & (col_first <= high[:, None])
      every = (col_first >= full_low[:, None]) & (col_last <= full_high[:, None])
    for flags in (rule(self, bq, bk, nq, nk) for rule in self._rules('blocks')):
      some, every = some & flags[0], every & flags[1]
    return jnp.where(some, jnp.where(every, FULL, PARTIAL), HIDDEN)

  def block_plan(self, bq: int, bk: int, nq: int, nk: int) -> BlockPlan:
    """The blocks to visit, both ways (``block_states``)."""
    return BlockPlan.from_states(self.block_states(bq, bk, nq, nk))


class Visits(NamedTuple):
  """Per block of one side, the blocks of the other side to visit: ``order
  [n, m]`` lists the partial blocks first, then the full ones (then the
  hidden), ``partial [n]`` and ``full [n]`` count them."""

  order: jax.Array
  partial: jax.Array
  full: jax.Array

  @classmethod
  def from_states(cls, states):
    order = jnp.argsort(states, axis=1, stable=True).astype(jnp.int32)
    count = lambda state: jnp.sum(states == state, axis=1, dtype=jnp.int32)
    return cls(order, count(PARTIAL), count(FULL))


class BlockPlan(NamedTuple):
  """One head's block-sparse plan: ``kv`` (per query block, the key blocks,
  for the forward) and ``q`` (per key block, the query blocks, for the
  backward: the transpose)."""

  kv: Visits
  q: Visits

  @classmethod
  def from_states(cls, states):
    return cls(Visits.from_states(states), Visits.from_states(states.T))


def _shift(rule, by):
  """A rule's intervals moved by ``by`` (positions to rows or columns); the
  far ends stay far enough for offsets well inside ``_FAR``."""
  return tuple((low + by, high + by) for low, high in rule)


def _band(first, last, before: int, after: int):
  """A window: position p sees ``p - before .. p + after``."""
  before, after = min(before, _FAR), min(after, _FAR)
  return (first - before, last + after), (last - before, first + after)


def _chunk(first, last, size: int):
  """A chunk: the same chunk as the position."""
  start = first // size * size
  seen = (start, last // size * size + size - 1)
  return seen, _where(first // size == last // size, (start, start + size - 1))


def _below(limit):
  """Columns below ``limit``."""
  return (-_FAR, limit - 1), (-_FAR, limit - 1)


def _all_if(some, every):
  """Every column, when ``some`` (or ``every``) row of the run counts."""
  return _where(some, (-_FAR, _FAR)), _where(every, (-_FAR, _FAR))


def _where(condition, interval):
  """``interval`` where ``condition`` holds, else the empty interval."""
  low, high = interval
  return jnp.where(condition, low, _FAR), jnp.where(condition, high, -_FAR)


def _in_blocks(x, axis: int, size: int):
  """``x`` with ``axis`` split into ``(blocks, size)``."""
  return x.reshape(x.shape[:axis] + (-1, size) + x.shape[axis + 1 :])


def _segment_blocks(q_seg, bq: int, kv_seg, bk: int):
  """``[nq, nk]`` flags (the blocks could share an id; both hold one and the
  same id) from the blocks' min and max ids; None without segment ids."""
  if q_seg is None:
    return None
  q_ids, kv_ids = _in_blocks(q_seg, 0, bq), _in_blocks(kv_seg, 0, bk)
  q_low, q_high = q_ids.min(axis=1)[:, None], q_ids.max(axis=1)[:, None]
  kv_low, kv_high = kv_ids.min(axis=1)[None, :], kv_ids.max(axis=1)[None, :]
  some = (kv_low <= q_high) & (kv_high >= q_low)
  every = (kv_low == kv_high) & (q_low == q_high) & (kv_low == q_low)
  return some, every


def _mask_blocks(mask, bq: int, bk: int):
  """``[nq|1, nk|1]`` flags (any visible; all visible) of a ``[T|1, S|1]``
  mask's blocks; None without a mask."""
  if mask is None:
    return None
  rows = _in_blocks(mask, 0, bq) if mask.shape[0] > 1 else mask[None]
  blocks = _in_blocks(rows, 2, bk) if mask.shape[1] > 1 else rows[..., None]
  return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


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
  start = [jnp.asarray(i if n > 1 else 0, jnp.int32) for i, n in ((r0, t), (c0, s))]
  return lax.dynamic_slice(
    x,
    start,
    (rows if t > 1 else 1, cols if s > 1 else 1),
  )
