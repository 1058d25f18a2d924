"""Ready ``score_mod``s and ``mask_mod``s: ALiBi, T5 relative-position
buckets, documents (with global tokens); ``and_masks``/``or_masks`` join
mask mods.

Each returns a ``jax.tree_util.Partial`` over its arrays: pass it as
``score_mod=``/``mask_mod=`` to ``jattn.dot_product_attention`` (or the
multi-head functions and wrappers); its arrays are operands, so a new array
does not retrace, and float ones (slopes, a bias table) get gradients.
Indices are global positions (``q_idx``/``kv_idx``), ``b`` the flat batch
row and ``h`` the query head, as every mod is handed them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jattn import _checks, _mods
from jattn._options import as_int


def _per_head(x, name: str, layout: str, axis: int) -> None:
  """``x.shape[axis]`` is the traced call's query heads H (one value per
  head: a K for H mix-up under GQA would reuse the last head's)."""
  dims = _mods.call_dims()
  if dims is not None and x.shape[axis] != dims.heads:
    raise ValueError(
      f'`{name}` {layout} has {x.shape[axis]} heads; this call has H='
      f'{dims.heads} query heads (one value per query head, not per KV head).'
    )


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes ``[H]`` (float32), as in the paper (Press et
  al., 2022): for H a power of 2, ``2^(-8 i / H)``, i = 1..H; otherwise the
  slopes of the power of 2 below H, then every other slope of the power of 2
  above it, for the rest: ``alibi_slopes(4)`` is ``[1/4, 1/16, 1/64,
  1/256]``.
  """
  num_heads = as_int(num_heads, 'num_heads', minimum=1)

  def power_of_2(n):
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

  below = 1 << (num_heads.bit_length() - 1)  # the power of 2 at or below H
  slopes = power_of_2(below)
  slopes += power_of_2(2 * below)[0::2][: num_heads - below]
  return np.asarray(slopes, np.float32)


def _alibi(slopes, score, b, h, q_idx, kv_idx):
  _per_head(slopes, 'slopes', '[H]', 0)
  return score + slopes[h] * (kv_idx - q_idx).astype(jnp.float32)


def _alibi_symmetric(slopes, score, b, h, q_idx, kv_idx):
  _per_head(slopes, 'slopes', '[H]', 0)
  return score - slopes[h] * jnp.abs(kv_idx - q_idx).astype(jnp.float32)


def alibi(slopes, *, symmetric: bool = False):
  """ALiBi as a ``score_mod``: ``score + slopes[h] * (kv_idx - q_idx)`` (the
  paper's, for causal attention), or ``score - slopes[h] * |kv_idx -
  q_idx|`` with ``symmetric`` (bidirectional). ``slopes`` float ``[H]``
  (``alibi_slopes(H)``, or learnable: they get gradients).

  Example::

    mod = jattn.mods.alibi(jattn.mods.alibi_slopes(8))
    out = jattn.dot_product_attention(q, k, v, is_causal=True, score_mod=mod)
  """
  slopes = jnp.asarray(slopes)
  _checks.check_array(slopes, 'slopes', min_rank=1, layout='[H]')
  _checks.check_floating(slopes, 'slopes')
  if slopes.ndim != 1:
    raise ValueError(f'`slopes` must be [H]; got shape {tuple(slopes.shape)}.')
  return Partial(_alibi_symmetric if symmetric else _alibi, slopes)


def _check_buckets(num_buckets, bidirectional: bool, max_distance) -> int:
  """``num_buckets`` and ``max_distance`` that make every bucket lie in
  ``[0, num_buckets)``; returns the exact buckets per direction."""
  num_buckets = as_int(num_buckets, 'num_buckets', minimum=4 if bidirectional else 2)
  exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
  if isinstance(max_distance, int) and max_distance <= exact:
    raise ValueError(
      f'`max_distance` must exceed the {exact} exact buckets of {num_buckets} '
      f'buckets (bidirectional={bidirectional}); got {max_distance}.'
    )
  return exact


def relative_position_buckets(
  relative_position, num_buckets: int, *, bidirectional: bool, max_distance
):
  """T5's buckets ``[0, num_buckets)`` of ``relative_position = kv_idx -
  q_idx`` (an integer array): exact for small distances, logarithmic up to
  ``max_distance``, the last bucket beyond; with ``bidirectional`` half the
  buckets are for keys after the query. ``num_buckets >= 2`` (4 with
  ``bidirectional``); ``max_distance`` above the exact buckets."""
  relative_position = jnp.asarray(relative_position)
  _checks.check_integer(relative_position, 'relative_position')
  bidirectional = bool(bidirectional)
  if not isinstance(max_distance, jax.Array):
    max_distance = as_int(max_distance, 'max_distance', minimum=1)
  _check_buckets(num_buckets, bidirectional, max_distance)
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(n < 0, num_buckets, 0)
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  exact = num_buckets // 2
  far = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact) / jnp.log(
    jnp.asarray(max_distance, jnp.float32) / exact
  )
  far = exact + (far * (num_buckets - exact)).astype(n.dtype)
  far = jnp.clip(far, exact, num_buckets - 1)
  return bucket + jnp.where(n < exact, n, far)


def _t5(bidirectional, table, max_distance, score, b, h, q_idx, kv_idx):
  _per_head(table, 'table', '[num_buckets, H]', 1)
  bucket = relative_position_buckets(
    kv_idx - q_idx,
    table.shape[0],
    bidirectional=bidirectional,
    max_distance=max_distance,
  )
  return score + table[bucket, h].astype(jnp.float32)


def _t5_bidirectional(table, max_distance, *args):
  return _t5(True, table, max_distance, *args)


def _t5_causal(table, max_distance, *args):
  return _t5(False, table, max_distance, *args)


def relative_position_bias(table, *, bidirectional: bool = True, max_distance=128):
  """A learned relative-position bias (T5) as a ``score_mod``: ``score +
  table[bucket(kv_idx - q_idx), h]`` with ``table [num_buckets, H]`` (it gets
  gradients) and ``relative_position_buckets``.

  Example::

    table = jnp.zeros((32, 8))  # a parameter of the model
    mod = jattn.mods.relative_position_bias(table)
    out = jattn.dot_product_attention(q, k, v, score_mod=mod)
  """
  table = jnp.asarray(table)
  _checks.check_array(table, 'table', min_rank=2, layout='[num_buckets, H]')
  _checks.check_floating(table, 'table')
  least = 4 if bidirectional else 2
  if table.ndim != 2 or table.shape[0] < least:
    raise ValueError(
      f'`table` must be [num_buckets, H] with at least {least} buckets '
      f'(bidirectional={bidirectional}); got shape {tuple(table.shape)}.'
    )
  max_distance = as_int(max_distance, 'max_distance', minimum=1)
  _check_buckets(table.shape[0], bidirectional, max_distance)
  fn = _t5_bidirectional if bidirectional else _t5_causal
  return Partial(fn, table, jnp.int32(max_distance))


def _at(x, b, position, name: str, size: str):
  """``(x[b, position], whether the position lies inside x)`` of a
  ``[B|1, N]`` array indexed by position; a batch of 1 serves every row."""
  dims = _mods.call_dims()
  if dims is not None:
    n = dims.q_size if size == 'T' else dims.kv_size
    if x.shape[0] not in (1, dims.batch) or x.shape[1] < n:
      raise ValueError(
        f'`{name}` [B|1, {size}...] must have B={dims.batch} (or 1) rows and '
        f'at least {size}={n} positions for this call; got shape {tuple(x.shape)}.'
      )
  row = 0 if x.shape[0] == 1 else b
  inside = (position >= 0) & (position < x.shape[1])
  return x[row, jnp.clip(position, 0, x.shape[1] - 1)], inside


def _same_document(q_ids, kv_ids, b, h, q_idx, kv_idx):
  (q, q_inside), (kv, kv_inside) = _ids(q_ids, kv_ids, b, q_idx, kv_idx)
  return (q == kv) & q_inside & kv_inside


def _ids(q_ids, kv_ids, b, q_idx, kv_idx):
  return _at(q_ids, b, q_idx, 'q_ids', 'T'), _at(kv_ids, b, kv_idx, 'kv_ids', 'S')


def _same_document_or_global(q_ids, kv_ids, q_global, kv_global, b, h, q_idx, kv_idx):
  (q, q_inside), (kv, kv_inside) = _ids(q_ids, kv_ids, b, q_idx, kv_idx)
  q_all, _ = _at(q_global, b, q_idx, 'q_global', 'T')
  kv_all, _ = _at(kv_global, b, kv_idx, 'kv_global', 'S')
  return ((q == kv) | q_all | kv_all) & q_inside & kv_inside


def _check_rank_2(x, name: str) -> None:
  _checks.check_array(x, name, min_rank=2, layout='[B|1, T|S]')
  if x.ndim != 2:
    raise ValueError(f'`{name}` must be [B|1, T|S]; got shape {tuple(x.shape)}.')


def document_mask(q_ids, kv_ids=None, *, q_global=None, kv_global=None):
  """A ``mask_mod`` for packed documents: query and key see each other when
  their ids match (``q_ids [B|1, T]``, ``kv_ids [B|1, S]``, default
  ``q_ids``; B the flat batch, 1 for ids every row shares). Positions
  (offsets included) index them: they may run longer than the call, for a
  cache step's positions, and a position past their end sees nothing.
  Negative ids mark nothing special. With ``q_global
  [B, T]``/``kv_global [B, S]`` (bool; ``kv_global`` defaults to
  ``q_global``), global tokens see and are seen by every token (Longformer's
  global attention). Combine with ``is_causal=True`` for causal documents;
  build its block mask with ``jattn.create_block_mask`` to skip the other
  documents' blocks.

  Example::

    docs = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
    first = jnp.arange(8)[None] == 0  # token 0 is global
    mod = jattn.mods.document_mask(docs, q_global=first)
    out = jattn.dot_product_attention(q, k, v, is_causal=True, mask_mod=mod)
  """
  q_ids = jnp.asarray(q_ids)
  kv_ids = q_ids if kv_ids is None else jnp.asarray(kv_ids)
  for name, ids in (('q_ids', q_ids), ('kv_ids', kv_ids)):
    _check_rank_2(ids, name)
    _checks.check_integer(ids, name)
  if q_global is None and kv_global is None:
    return Partial(_same_document, q_ids, kv_ids)
  q_global = jnp.zeros(q_ids.shape, bool) if q_global is None else q_global
  kv_global = q_global if kv_global is None else kv_global
  for name, flags in (('q_global', q_global), ('kv_global', kv_global)):
    _check_rank_2(flags, name)
    if flags.dtype != jnp.bool_:
      raise TypeError(f'`{name}` must be boolean (True: global); got {flags.dtype}.')
  return Partial(_same_document_or_global, q_ids, kv_ids, q_global, kv_global)


def and_masks(*mask_mods):
  """One ``mask_mod`` that lets a query see a key when every one of
  ``mask_mods`` does (as FlexAttention's ``and_masks``); their arrays stay
  operands."""
  return _mods.combine('and', mask_mods)


def or_masks(*mask_mods):
  """One ``mask_mod`` that lets a query see a key when any of ``mask_mods``
  does (as FlexAttention's ``or_masks``)."""
  return _mods.combine('or', mask_mods)
