"""JAX's TPU splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``)
behind jattn's contract; on other backends it runs in Pallas interpret mode
(the CPU test path), and the automatic choice takes it on TPUs only.

Splash runs one sequence, ``q [H, T, D]`` against ``k, v [K, S, X]`` (query
head h reads KV head ``h // G``), in tiles of ``TILE`` x ``TILE``; here it is
vmapped over the batch. What a call says becomes what splash takes:

  block plan            jattn's block states at splash's tiles (every rule
                        that classifies blocks: lengths, segments, causal,
                        window, chunk, offsets), built under jit per sequence:
                        ``MaskInfo`` block kinds and the tiles to fetch, for
                        the forward and, transposed, for dK/dV. Hidden tiles
                        are skipped; no ``[T, S]`` array is built.
  causal/window/chunk   a static mask function of (query position minus the
                        key offset, key index); ``q_sequence`` carries the
                        positions, so offsets stay runtime data.
  other element rules   (prefix-LM, a dense mask, a ``mask_mod`` or block
                        mask, a chunk with key offsets) the sequence's tiles
                        of jattn's element test, ``partial_mask_blocks``
                        (T·S bools per sequence, shared by its heads; the
                        automatic choice takes this only up to
                        ``MAX_TILE_BYTES``).
  lengths, segment ids  ``SegmentIds``, which also hide the padding to whole
                        tiles.
  scale                 folded into q; soft-cap and sinks passed through.
  rows that see nothing a sink of ``_NO_SINK`` where the call has none: such a
                        row keeps total 1 and a zero output (splash alone
                        gives NaN, or mean(V) when a visited tile hides it).

``supports`` refuses, with the reason, what it cannot express.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask_info as mask_info,
)

from jattn._heads import map_heads
from jattn._types import FULL, HIDDEN, Prepared, options_given
from jattn._visibility import pad_axis, refused

# Splash's tile (query and key blocks); T and S are padded to multiples.
TILE = 128
# The sink of a call without one: far below any logit, far above splash's
# mask value.
_NO_SINK = -1e30
# Segment ids of padded or outside query rows and keys (they match nothing).
_NO_ROW, _NO_KEY = jnp.iinfo(jnp.int32).min + 1, jnp.iinfo(jnp.int32).min
# A window edge past any position (int32 arithmetic stays exact).
_FAR = 2**29

# Rules that need the element tiles (the mask function cannot say them).
_ELEMENT_RULES = {'prefix_lengths', 'mask', 'mask_mod', 'mod_blocks', 'mod_grid'}
# The largest element tiles of a sequence the automatic choice builds.
MAX_TILE_BYTES = 2**24

# What it expresses: the visibility value's fields and the call's options.
_RULES = _ELEMENT_RULES | {
  'is_causal',
  'window',
  'chunk_size',
  'query_seq_lengths',
  'key_value_seq_lengths',
  'q_offsets',
  'kv_offsets',
  'q_segment_ids',
  'kv_segment_ids',
  'q_size',
  'kv_size',
  'batch_index',
  'head_index',
}
_OPTIONS = {'scale', 'is_causal', 'window', 'chunk_size', 'soft_cap', 'implementation'}


@functools.lru_cache
def _rule_function(is_causal: bool, window, chunk_size):
  """The static rules as splash's ``mask_function(q, k)``: ``q`` a row's
  position minus the key offset, ``k`` a key's index; None without rules."""
  if not (is_causal or window or chunk_size):
    return None

  def visible(q, k):
    conditions = []
    if is_causal:
      conditions.append(k <= q)
    if window is not None:
      left, right = (min(w, _FAR) for w in window)
      conditions.append((k >= q - left) & (k <= q + right))
    if chunk_size is not None:
      conditions.append(q // chunk_size == k // chunk_size)
    return functools.reduce(jnp.logical_and, conditions)

  return visible


def _fetch_order(nonzero, axis: int):
  """The tile each grid step fetches along ``axis``: its own when visited,
  else the next visited one (else the last), so skipped steps load nothing
  new."""
  n = nonzero.shape[axis]
  index = jax.lax.broadcasted_iota(jnp.int32, nonzero.shape, axis)
  following = jnp.where(nonzero, index, n)
  following = jax.lax.cummin(following, axis=axis, reverse=True)
  previous = jax.lax.cummax(jnp.where(nonzero, index, 0), axis=axis)
  return jnp.where(following < n, following, previous)


def _needs_elements(vis) -> bool:
  """Whether a rule of the call needs the element tiles."""
  element_rules = _ELEMENT_RULES.intersection(vis.given())
  return bool(element_rules) or (
    vis.chunk_size is not None and vis.kv_offsets is not None
  )


def _per_sequence(p: Prepared, fn):
  """``fn(vis)`` for each sequence's visibility value, padded to whole tiles
  and asked of one head (no rule splash takes differs by head): ``[B, ...]``."""
  one = p.q[:, :, :1, :0], p.k[:, :, :1, :0]  # one head, no features
  vis = p.vis.replace(head_index=p.vis.head_index[:1])
  q_size, kv_size = (-(-n // TILE) * TILE for n in (p.q.shape[1], p.k.shape[1]))

  def head(q, k, v, bias, vis, seed):
    return fn(vis.pad(q_size, kv_size, k.shape[0]))

  return map_heads(head, *one, one[1], None, vis, None, out_axis=0)[:, 0, 0]


def _element_tiles(p: Prepared, q_size: int, kv_size: int):
  """``[B, nq·nk, TILE, TILE]`` bool: jattn's element test of each tile of
  each sequence."""

  def elements(vis):
    visible = vis.elements(0, 0, q_size, kv_size)
    return jnp.ones((q_size, kv_size), bool) if visible is None else visible

  visible = _per_sequence(p, elements)
  tiles = visible.reshape(-1, q_size // TILE, TILE, kv_size // TILE, TILE)
  return jnp.swapaxes(tiles, 2, 3).reshape(visible.shape[0], -1, TILE, TILE)


def _kernel(states, q_sequence, tiles, p: Prepared, interpret: bool):
  """The splash kernel of one sequence from jattn's ``states [nq, nk]``
  and, for element rules, its ``tiles`` (else None)."""
  kinds = jnp.where(states == HIDDEN, 0, jnp.where(states == FULL, 2, 1))[None]
  nonzero = kinds > 0
  rule, positions, tile_index, dkv_tiles = None, None, None, None
  if tiles is None:
    rule = _rule_function(p.vis.is_causal, p.vis.window, p.vis.chunk_size)
    positions = None if rule is None else q_sequence
  else:
    tile_index = jnp.arange(kinds.size, dtype=jnp.int32).reshape(kinds.shape)
    dkv_tiles = jnp.swapaxes(tiles, 1, 2)  # dK/dV read them key-major
  forward = mask_info.MaskInfo(
    _fetch_order(nonzero, 2), tile_index, kinds, tiles, positions
  )
  # dK/dV walk query tiles per key tile: the same kinds, fetched by row.
  backward = mask_info.MaskInfo(
    _fetch_order(nonzero, 1), tile_index, kinds, dkv_tiles, positions
  )
  sizes = splash.BlockSizes(
    block_q=TILE, block_kv=TILE, block_kv_compute=TILE,
    block_q_dkv=TILE, block_kv_dkv=TILE, block_kv_dkv_compute=TILE,
    use_fused_bwd_kernel=True,
  )  # fmt: skip
  return splash.SplashAttentionKernel(
    forward,
    None,
    backward,
    block_sizes=sizes,
    is_mqa=False,
    save_residuals=False,
    mask_value=splash.DEFAULT_MASK_VALUE,
    attn_logits_soft_cap=p.opts.soft_cap,
    residual_checkpoint_name=None,
    mask_function=rule,
    interpret=interpret,
  )


def _ids(ids, count, length: int, size: int, none: int):
  """``[B, size]`` segment ids: ``ids [B, length]`` (None: one segment) for
  each sequence's first ``count [B]`` (None: all ``length``) entries, then
  ``none``."""
  index = jnp.arange(size, dtype=jnp.int32)[None]
  real = index < (length if count is None else jnp.minimum(count, length)[:, None])
  ids = jnp.zeros((1, size), jnp.int32) if ids is None else pad_axis(ids, 1, size)
  return jnp.where(real, ids.astype(jnp.int32), none)


class Splash:
  """The kernel contract (see ``_registry``)."""

  name = 'splash'

  def supports(self, p: Prepared) -> list[str]:
    reasons = refused(p.vis.given(), _RULES)
    reasons += refused(options_given(p.opts), _OPTIONS)
    if p.bias is not None:
      reasons.append('a bias (splash adds none)')
    if p.score_mod is not None:
      reasons.append('a score_mod (splash has only the soft-cap)')
    if p.opts.return_residual:
      reasons.append(
        'return_residual (splash returns its log-sum-exp only from a forward '
        'that cannot be differentiated)'
      )
    if p.vis.differs_by_head:
      reasons.append(
        'a mask, block mask or mask_mod that differs by head (its tiles are '
        'per sequence here)'
      )
    if jnp.dtype(p.q.dtype) == jnp.float64:
      reasons.append('float64 inputs (TPU tiles are float32 or narrower)')
    return reasons

  def preferred(self, p: Prepared) -> bool:
    """The automatic choice builds element tiles only up to ``MAX_TILE_BYTES``
    per sequence."""
    q_size, kv_size = (-(-n // TILE) * TILE for n in (p.q.shape[1], p.k.shape[1]))
    return not _needs_elements(p.vis) or q_size * kv_size <= MAX_TILE_BYTES

  def __call__(self, p: Prepared):
    batch, q_len, heads, _ = p.q.shape
    kv_len = p.k.shape[1]
    nq, nk = -(-q_len // TILE), -(-kv_len // TILE)
    q_size, kv_size = nq * TILE, nk * TILE
    vis = p.vis
    states = _per_sequence(p, lambda vis: vis.block_states(TILE, TILE, nq, nk))
    per_row = lambda x: jnp.zeros((batch,), jnp.int32) if x is None else x
    shift = (per_row(vis.q_offsets) - per_row(vis.kv_offsets)).astype(jnp.int32)
    q_sequence = jnp.arange(q_size, dtype=jnp.int32)[None] + shift[:, None]
    q_ids = _ids(vis.q_segment_ids, vis.query_seq_lengths, q_len, q_size, _NO_ROW)
    kv_ids = _ids(
      vis.kv_segment_ids, vis.key_value_seq_lengths, kv_len, kv_size, _NO_KEY
    )
    q_ids, kv_ids = (jnp.broadcast_to(x, (batch, x.shape[1])) for x in (q_ids, kv_ids))
    sinks = jnp.full((heads,), _NO_SINK) if p.sinks is None else p.sinks
    sinks = jnp.maximum(sinks, _NO_SINK)
    # [B, H, T, D] with the scale folded in, in the inputs' dtype
    q = (p.q.astype(jnp.float32) * jnp.float32(p.opts.scale)).astype(p.q.dtype)
    q = jnp.swapaxes(pad_axis(q, 1, q_size), 1, 2)
    k, v = (jnp.swapaxes(pad_axis(x, 1, kv_size), 1, 2) for x in (p.k, p.v))
    interpret = p.backend != 'tpu'
    tiles = _element_tiles(p, q_size, kv_size) if _needs_elements(vis) else None

    def one(q, k, v, states, q_sequence, q_ids, kv_ids, tiles):
      kernel = _kernel(states, q_sequence, tiles, p, interpret)
      return kernel(q, k, v, segment_ids=splash.SegmentIds(q_ids, kv_ids), sinks=sinks)

    out = jax.vmap(one)(q, k, v, states, q_sequence, q_ids, kv_ids, tiles)
    return jnp.swapaxes(out, 1, 2)[:, :q_len], None
