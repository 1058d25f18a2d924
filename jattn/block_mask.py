"""``BlockMask`` and ``create_block_mask``: which blocks a ``mask_mod`` hides,
leaves partly or fully visible, evaluated block by block under ``jax.jit``."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jattn import _mods
from jattn._options import as_int, check_block_sizes
from jattn._options import block_sizes as default_block_sizes
from jattn._types import FULL, HIDDEN, PARTIAL
from jattn._visibility import Visibility


@jax.tree_util.register_pytree_node_class
class BlockMask:
  """A ``mask_mod`` and its block states, built by ``jattn.create_block_mask``.

  ``states`` int8 ``[B|1, H|1, nq, nk]``: per (query block, key block) of
  ``block_sizes`` over ``T`` x ``S`` (``shape = (B|1, H|1, T, S)``), 0 =
  partial (the kernel tests each element with ``mask_mod``), 1 = full (every
  element may attend: no test), 2 = hidden (skipped). A pytree: it passes
  through ``jax.jit`` and can be built inside one from runtime data.
  """

  def __init__(self, states, mask_mod, shape, block_sizes):
    self.states, self.mask_mod = states, mask_mod
    self.shape, self.block_sizes = tuple(shape), tuple(block_sizes)

  def tree_flatten(self):
    static, leaves = _mods.split(self.mask_mod)
    return (self.states, leaves), (static, self.shape, self.block_sizes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    static, shape, block_sizes = aux
    states, leaves = children
    return cls(states, _mods.join(static, leaves), shape, block_sizes)

  def __and__(self, other) -> BlockMask:
    """Visible where both are: hidden where either block is hidden, full
    where both are full (else partial: safe, tested element by element);
    the mods joined by ``jattn.mods.and_masks``."""
    return self._combined(other, 'and')

  def __or__(self, other) -> BlockMask:
    """Visible where either is: hidden where both blocks are hidden, full
    where either is full; the mods joined by ``jattn.mods.or_masks``."""
    return self._combined(other, 'or')

  def _combined(self, other, op: str) -> BlockMask:
    if not isinstance(other, BlockMask):
      return NotImplemented
    (b, h, t, s), (ob, oh, ot, os_) = self.shape, other.shape
    fits = lambda x, y: x == y or 1 in (x, y)
    same = (t, s, self.block_sizes) == (ot, os_, other.block_sizes)
    if not (same and fits(b, ob) and fits(h, oh)):
      raise ValueError(
        f'block masks combine when built for the same T, S and block sizes (B '
        f'and H may be 1): got {self.shape} with {self.block_sizes} and '
        f'{other.shape} with {other.block_sizes}.'
      )
    hidden_a, hidden_b = self.states == HIDDEN, other.states == HIDDEN
    full_a, full_b = self.states == FULL, other.states == FULL
    if op == 'and':
      hidden, full = hidden_a | hidden_b, full_a & full_b
    else:
      hidden, full = hidden_a & hidden_b, full_a | full_b
    states = jnp.where(hidden, HIDDEN, jnp.where(full, FULL, PARTIAL))
    mod = _mods.combine(op, (self.mask_mod, other.mask_mod))
    shape = (max(b, ob), max(h, oh), t, s)
    return BlockMask(states.astype(jnp.int8), mod, shape, self.block_sizes)

  def to_block_sizes(self, block_sizes) -> BlockMask:
    """The same mask for other ``(query, key)`` block sizes: a block is
    hidden (full) when every block of this mask it overlaps is hidden
    (full), else partial. Exact for multiples of these sizes; otherwise
    safe (a partial block is tested element by element)."""
    bq2, bk2 = check_block_sizes(block_sizes)
    if (bq2, bk2) == self.block_sizes:
      return self
    (bq, bk), (_, _, t, s) = self.block_sizes, self.shape
    gq, gk = math.gcd(bq, bq2), math.gcd(bk, bk2)  # cells inside both
    nq, nk = self.states.shape[2:]
    nq2, nk2 = -(-t // bq2), -(-s // bk2)
    # Each cell's state, from the block it lies in; cells past T or S pad.
    rows = jnp.arange(nq2 * (bq2 // gq)) * gq // bq
    cols = jnp.arange(nk2 * (bk2 // gk)) * gk // bk
    real = (rows[:, None] < nq) & (cols[None, :] < nk)
    rows, cols = jnp.minimum(rows, nq - 1), jnp.minimum(cols, nk - 1)
    cells = self.states[:, :, rows][:, :, :, cols]
    grouped = lambda x: x.reshape(x.shape[:2] + (nq2, bq2 // gq, nk2, bk2 // gk))
    padding = ~real[None, None]
    hidden = grouped((cells == HIDDEN) | padding).all(axis=(3, 5))
    full = grouped((cells == FULL) | padding).all(axis=(3, 5))
    states = jnp.where(hidden, HIDDEN, jnp.where(full, FULL, PARTIAL))
    return BlockMask(states.astype(jnp.int8), self.mask_mod, self.shape, (bq2, bk2))

  @property
  def grid(self) -> tuple[int, int, int, int]:
    """``(T, S, bq, bk)``: the positions and blocks the states cover."""
    return (*self.shape[2:], *self.block_sizes)

  def sparsity(self):
    """The fraction of blocks skipped (hidden)."""
    return jnp.mean(self.states == HIDDEN)

  def __repr__(self):
    return (
      f'BlockMask(shape={self.shape}, block_sizes={self.block_sizes}, '
      f'mask_mod={getattr(self.mask_mod, "__name__", self.mask_mod)})'
    )


def create_block_mask(mask_mod, B, H, T, S, *, block_sizes=None) -> BlockMask:
  """The block mask of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over
  ``B`` (flat batch rows; None: 1, the mod must not depend on ``b``) x
  ``H`` (query heads; None: 1, the mod must not depend on ``h``) x ``T``
  queries x ``S`` keys (a ValueError says so when it does).

  Each (query block, key block) of ``block_sizes`` (default: flash's for
  this backend and these lengths) is hidden, full or partial; flash then
  skips the hidden blocks and tests elements only in the partial ones. Pass
  it as ``block_mask=`` to ``jattn.dot_product_attention``, the multi-head
  functions, the wrappers or ``jattn.sharding.ring_attention``; build it
  once and use it in every layer. The states describe query positions
  ``0..T-1`` and key positions ``0..S-1``; a kernel reads them at its own
  block sizes and at the call's positions (``q_offsets``/``kv_offsets``, a
  ring step's chunks, a cache step's rows: the rows of a decode step read
  their own rows' states), and tests the mod element by element where they
  do not reach (the same mask, without the skipping). The mod is
  evaluated one ``[block, S]`` slab at a time (never ``[T, S]``); inside a
  ``jax.jit`` it may close over runtime arrays (document ids).

  Example::

    causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
    block_mask = jattn.create_block_mask(causal, None, None, 4096, 4096)
    out = jattn.dot_product_attention(q, k, v, block_mask=block_mask)
  """
  shared = [name for name, n in (('b', B), ('h', H)) if n is None]
  B = 1 if B is None else as_int(B, 'B', minimum=1)
  H = 1 if H is None else as_int(H, 'H', minimum=1)
  T, S = as_int(T, 'T', minimum=1), as_int(S, 'S', minimum=1)
  blocks = default_block_sizes(T, S, check_block_sizes(block_sizes))
  mod = _mods.Mod.trace(mask_mod, 'mask_mod', _mods.CallDims(B, H, T, S))
  for argument in shared:
    if mod.depends_on(argument):
      size = 'B' if argument == 'b' else 'H'
      raise ValueError(
        f'the mask_mod depends on `{argument}`, so its block mask needs '
        f'{size}: pass {size} (not None).'
      )
  static, leaves = _mods.split(mask_mod)
  states = _states(leaves, static, (B, H, T, S), blocks)
  return BlockMask(states, mask_mod, (B, H, T, S), blocks)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _states(leaves, static, shape, blocks):
  """``[B, H, nq, nk]`` int8 states, one query block (of every key) at a time."""
  mod = _mods.Mod.trace(_mods.join(static, leaves), 'mask_mod', _mods.CallDims(*shape))
  B, H, T, S = shape
  bq, bk = blocks
  nq, nk = -(-T // bq), -(-S // bk)

  def query_block(n):
    b, h, i = n // (H * nq), n // nq % H, n % nq
    vis = Visibility(q_size=T, kv_size=S, mask_mod=mod, batch_index=b, head_index=h)
    # Padded rows and columns repeat the last real one (mod_indices clamps):
    # they change neither any nor all.
    visible = mod.on_block(*vis.mod_indices(i * bq, 0, bq, nk * bk))
    visible = visible.reshape(bq, nk, bk)
    some, every = visible.any(axis=(0, 2)), visible.all(axis=(0, 2))
    return jnp.where(some, jnp.where(every, FULL, PARTIAL), HIDDEN).astype(jnp.int8)

  states = lax.map(query_block, jnp.arange(B * H * nq, dtype=jnp.int32))
  return states.reshape(B, H, nq, nk)


def check_broadcast(mask_mod: _mods.Mod, block_mask: BlockMask, dims: _mods.CallDims):
  """A block mask built for one batch row (or head) serves them all only
  if its mod does not depend on ``b`` (or ``h``)."""
  for argument, built, size, what in (
    ('b', block_mask.shape[0], dims.batch, 'B'),
    ('h', block_mask.shape[1], dims.heads, 'H'),
  ):
    if built == 1 < size and mask_mod.depends_on(argument):
      raise ValueError(
        f'`block_mask` was built for {what}=1 but its mask_mod depends on '
        f'`{argument}` and this call has {what}={size}: build it with '
        f'{what}={size}.'
      )


def checked_block_mask(block_mask, dims: _mods.CallDims):
  """A call's ``block_mask`` checked against the call: its states ``[B|1,
  H|1, nq, nk]``. They are looked up by position at the kernel's own block
  sizes (``_visibility``), so the call may have other lengths, offsets and
  block sizes than the mask was built for."""
  batch, heads = dims.batch, dims.heads
  if not isinstance(block_mask, BlockMask):
    raise TypeError(
      '`block_mask` must be a jattn.BlockMask (from jattn.create_block_mask); '
      f'got {type(block_mask).__name__}.'
    )
  b, h, t, s = block_mask.shape
  if b not in (1, batch) or h not in (1, heads):
    raise ValueError(
      f'`block_mask` was built for (B, H, T, S) = {block_mask.shape}; this '
      f'call has B={batch}, H={heads} (B and H may be 1).'
    )
  bq, bk = block_mask.block_sizes
  states_shape = (b, h, -(-t // bq), -(-s // bk))
  if tuple(block_mask.states.shape) != states_shape:
    raise ValueError(
      f'`block_mask.states` must be [B|1, H|1, nq, nk] = {states_shape} for '
      f'its shape and block sizes {block_mask.block_sizes}; got '
      f'{tuple(block_mask.states.shape)}.'
    )
  return block_mask.states
