"""Bring a public call to the kernels' layout: the ``Prepared`` value.

Everything here runs at trace time: shapes and dtypes are static, so bad input
fails before anything is computed, with a message that names the argument.
The jobs, each in its module: the call's parts before its jit (``_call``),
the operands (``_operands``), the per-sequence arrays (here, from the
visibility table), the user functions and their block mask
(``block_mask``), the visibility value (``_visibility``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jattn import _checks, _operands
from jattn._call import Call, Mods, split_call
from jattn._mods import CallDims, Mod, join
from jattn._types import Options, Prepared
from jattn._visibility import ARRAYS, STATIC_RULES, Visibility
from jattn.block_mask import check_broadcast, checked_block_mask


def prepare_arguments(**arguments) -> Prepared:
  """``prepare`` of a public call's keyword arguments, outside any jit (for
  tests and tools that inspect a prepared call)."""
  return prepare_call(*split_call(arguments, strict=True))


def prepare_call(
  call: Call, opts: Options, statics, kv_heads_first: bool = False
) -> Prepared:
  """``prepare`` of a ``split_call``'s parts, inside the jit;
  ``kv_heads_first``: ``Prepared.kv_heads_first``."""
  mask_mod, score_mod = map(join, statics, call.mod_leaves)
  mods = Mods(mask_mod, score_mod, call.block_mask)
  p = prepare(
    call.query, call.key, call.value, call.bias, call.mask, call.arrays,
    call.dropout_rng, opts, call.sinks, mods,
  )  # fmt: skip
  return p._replace(kv_heads_first=kv_heads_first)


def prepare(
  query,
  key,
  value,
  bias,
  mask,
  arrays: dict,
  dropout_rng,
  opts: Options,
  sinks=None,
  mods: Mods = Mods(),
) -> Prepared:
  """Check every argument against the others; flatten batch dims."""
  q, k, v, batch_shape = _operands.qkv(query, key, value)
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  bias, mask = _operands.logits_arrays(bias, mask, batch_shape, heads, q_len, kv_len)
  arrays = _sequence_arrays(arrays or {}, opts, batch_shape, q_len, kv_len)
  if opts.scale is None:
    opts = dataclasses.replace(opts, scale=1.0 / math.sqrt(head_dim))
  seed = None
  if dropout_rng is not None:
    _checks.check_prng_key(dropout_rng, 'dropout_rng')
  if opts.dropout_rate > 0.0:
    seed = jax.random.bits(dropout_rng, (batch, heads), jnp.uint32)
  vis = Visibility(
    **{name: getattr(opts, name) for name in STATIC_RULES},
    **arrays,
    kv_size=kv_len,
    mask=mask,
    batch_index=jnp.arange(batch, dtype=jnp.int32),
    head_index=jnp.arange(heads, dtype=jnp.int32),
  )
  dims = CallDims(batch, heads, q_len, kv_len)
  mask_mod, mod_blocks, mod_grid = mods.mask_mod, None, None
  if mods.block_mask is not None:
    mod_blocks = checked_block_mask(mods.block_mask, dims)
    mask_mod, mod_grid = mods.block_mask.mask_mod, mods.block_mask.grid
  if mask_mod is not None:
    mask_mod = Mod.trace(mask_mod, 'mask_mod', dims)
    if mod_blocks is not None:
      check_broadcast(mask_mod, mods.block_mask, dims)
  vis = vis.replace(
    q_size=q_len, mask_mod=mask_mod, mod_blocks=mod_blocks, mod_grid=mod_grid
  )
  score_mod = None
  if mods.score_mod is not None:
    score_mod = Mod.trace(mods.score_mod, 'score_mod', dims)
  empty = batch == 0 or q_len == 0 or kv_len == 0
  sinks = _operands.sinks(sinks, heads)
  backend = jax.default_backend()
  return Prepared(
    q, k, v, bias, vis, seed, opts, batch_shape, empty, backend, sinks, score_mod
  )


# A per-sequence array's trailing dims, by axis kind (after B...).
_TAIL = {
  'sequence': lambda t, s: (),
  'rows': lambda t, s: (t,),
  'cols': lambda t, s: (s,),
}


def _sequence_arrays(arrays: dict, opts: Options, batch_shape, q_len, kv_len) -> dict:
  """The per-sequence arrays (``sequence_arrays()``) checked against the call
  and flattened to ``[B, ...]`` int32 (whatever integer dtype was given, as
  the kernels' row and column indices are); ``kv_segment_ids`` defaults to
  ``q_segment_ids`` when T == S."""
  if 'prefix_lengths' in arrays and not opts.is_causal:
    raise ValueError(
      '`prefix_lengths` [B...] makes a causal mask bidirectional inside the '
      'prefix; it needs is_causal=True.'
    )
  if 'kv_segment_ids' not in arrays and 'q_segment_ids' in arrays:
    if kv_len != q_len:
      raise ValueError(
        '`kv_segment_ids` [B..., S] is required when T != S; got T='
        f'{q_len}, S={kv_len}.'
      )
    arrays = dict(arrays, kv_segment_ids=arrays['q_segment_ids'])
  if 'q_segment_ids' not in arrays and 'kv_segment_ids' in arrays:
    raise ValueError('`kv_segment_ids` was given without `q_segment_ids`.')
  batch = math.prod(batch_shape)
  checked = {}
  for name, x in arrays.items():
    array = ARRAYS[name]
    tail = _TAIL[array.kind](q_len, kv_len)
    x = jnp.asarray(x)
    _checks.check_integer(x, name)
    _checks.check_shape(x, name, batch_shape + tail, array.layout)
    checked[name] = x.reshape((batch,) + tail).astype(jnp.int32)
  return checked
