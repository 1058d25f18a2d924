"""Sharding across devices: mesh axis names, PartitionSpecs, placement, ring.

jattn owns three mesh axes, named here and nowhere else:

- ``DATA`` ('data'): the batch B;
- ``MODEL`` ('model'): attention heads H (and KV heads K when they divide);
- ``SEQ`` ('seq'): the sequence, for ring attention (``ring_attention``).

A mesh may have any subset of them; specs name only the axes the mesh has.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn import _call, _prepare, _ring, attention
from jattn._params import PROJECTIONS

DATA, MODEL, SEQ = 'data', 'model', 'seq'
AXES = (DATA, MODEL, SEQ)


def make_mesh(
  shape: Mapping[str, int] | Sequence[int],
  axis_names: Sequence[str] | None = None,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A mesh of ``shape`` over ``devices`` (default: all devices).

  ``make_mesh({'data': 2, 'model': 4})`` or ``make_mesh((2, 4), ('data',
  'model'))``. A size of -1 takes the devices left over. Raises ValueError
  when the sizes do not multiply to the device count.
  """
  if isinstance(shape, Mapping):
    axis_names, sizes = tuple(shape), list(shape.values())
  else:
    sizes = list(shape)
    axis_names = tuple(axis_names or AXES[: len(sizes)])
  if len(axis_names) != len(sizes):
    raise ValueError(
      f'`axis_names` {axis_names} and `shape` {tuple(sizes)} differ in length.'
    )
  unknown = [name for name in axis_names if name not in AXES]
  if unknown:
    raise ValueError(f'mesh axes must be among {AXES}; got {unknown}.')
  devices = list(jax.devices() if devices is None else devices)
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh size may be -1; got {tuple(sizes)}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(
        f'mesh {dict(zip(axis_names, sizes, strict=True))} does not divide '
        f'{len(devices)} devices.'
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices) or min(sizes) <= 0:
    raise ValueError(
      f'mesh {dict(zip(axis_names, sizes, strict=True))} needs '
      f'{math.prod(sizes)} devices; {len(devices)} are available. Pass '
      '`devices=` or change the shape.'
    )
  return Mesh(np.asarray(devices).reshape(sizes), tuple(axis_names))


def _axis(mesh: Mesh, name: str, dim: int | None = None) -> str | None:
  """``name`` if the mesh has it (and it divides ``dim``), else None."""
  if name not in mesh.shape or mesh.shape[name] == 1:
    return None
  if dim is not None and dim % mesh.shape[name]:
    return None
  return name


def param_specs(params, mesh: Mesh):
  """PartitionSpecs for the multi-head parameter pytree: heads over ``model``.

  Query and out projections (and the sinks) split H; key and value split K
  when the model axis divides it (GQA with few KV heads stays replicated).
  """
  heads = params['query']['kernel'].shape[1]
  kv_heads = params['key']['kernel'].shape[1]
  h = _axis(mesh, MODEL, heads)
  k = _axis(mesh, MODEL, kv_heads) if h else None
  head_axis = {'query': h, 'key': k, 'value': k, 'out': h}
  specs = {'sinks': P(h)} if 'sinks' in params else {}
  for name in PROJECTIONS:
    projection, axis = params[name], head_axis[name]
    specs[name] = {
      'kernel': P(axis, None, None) if name == 'out' else P(None, axis, None)
    }
    if 'bias' in projection:
      specs[name]['bias'] = P(None) if name == 'out' else P(axis, None)
  return specs


def cache_specs(kv_cache, mesh: Mesh):
  """PartitionSpecs of a ``jattn.cache`` cache: sequences over ``data``,
  KV heads over ``model`` (where the axes divide B and K); a paged cache's
  pool splits its heads, its page table and lengths the sequences."""
  batch = kv_cache.lengths.shape[0]
  return kv_cache.specs(_axis(mesh, DATA, batch), _axis(mesh, MODEL, kv_cache.kv_heads))


def linear_specs(params, mesh: Mesh, *, split: str):
  """PartitionSpecs of a dense layer ``{'kernel': [E, F], 'bias': [F]}``,
  Megatron-style over ``model``.

  ``split='outputs'`` (column-parallel, an MLP's first layer) splits F;
  ``split='inputs'`` (row-parallel, its second) splits E, so the pair needs
  one all-reduce, after the second. A layer stays replicated where the model
  axis does not divide the split dimension.
  """
  if split not in ('outputs', 'inputs'):
    raise ValueError(f"`split` must be 'outputs' or 'inputs'; got {split!r}.")
  in_features, out_features = params['kernel'].shape
  if split == 'outputs':
    axis = _axis(mesh, MODEL, out_features)
    specs = {'kernel': P(None, axis), 'bias': P(axis)}
  else:
    specs = {'kernel': P(_axis(mesh, MODEL, in_features), None), 'bias': P(None)}
  return {name: specs[name] for name in params}


def activation_spec(mesh: Mesh, *, heads: bool = True) -> P:
  """``[B, T, H, D]`` over (data, seq, model); ``heads=False``: ``[B, T, E]``."""
  batch, seq = _axis(mesh, DATA), _axis(mesh, SEQ)
  if heads:
    return P(batch, seq, _axis(mesh, MODEL), None)
  return P(batch, seq, None)


def shard_params(params, mesh: Mesh):
  """``params`` placed on ``mesh`` by ``param_specs``."""
  specs = param_specs(params, mesh)
  return jax.tree.map(
    lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params, specs
  )


def shard_batch(x, mesh: Mesh, *, heads: bool = False):
  """An activation placed on ``mesh``: ``[B, T, E]`` (or ``[B, T, H, D]``)."""
  spec = activation_spec(mesh, heads=heads)
  spec = P(*spec[: x.ndim]) if x.ndim < len(spec) else spec
  return jax.device_put(x, NamedSharding(mesh, spec))


def ring_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  mesh: Mesh,
  seq_axis: str = SEQ,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  local_window_size=None,
  attention_chunk_size=None,
  prefix_lengths=None,
  q_offsets=None,
  kv_offsets=None,
  logits_soft_cap: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool | None = None,
  implementation: str | None = None,
  block_sizes: tuple[int, int] | None = None,
  return_residual: bool = False,
  sinks=None,
  mask_mod=None,
  score_mod=None,
  block_mask=None,
):
  """Sequence-parallel attention: T and S sharded over ``mesh[seq_axis]``.

  The arguments and result of ``jattn.dot_product_attention`` (jit-compiled,
  ``return_residual`` and zero sizes included), with two differences: every
  ring step runs the flash kernel, so ``implementation`` may only be None or
  ``'flash'``; and a dense ``mask`` or ``bias`` (``[T, S]`` is not
  sequence-shardable) is a ``ValueError``, as is causal attention with
  T != S. Batch and heads are also split over the mesh's ``data`` and
  ``model`` axes when it has them and they divide B and both H and K.
  Causal attention runs in zig-zag order so every device does equal work.
  Any T and S work (padded inside to a multiple of the ring size; 2x for
  causal). ``mask_mod`` and ``score_mod`` see global positions; each step
  skips what a ``block_mask`` hides in its pair of chunks.
  """
  call, opts, statics = _call.split_call(locals())
  if opts.implementation not in (None, 'flash'):
    raise ValueError(
      "`implementation` of ring_attention must be None or 'flash' (each ring "
      f'step is the flash kernel); got {opts.implementation!r}.'
    )
  if not isinstance(mesh, Mesh):
    raise TypeError(f'`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.')
  return _ring_jit(call, opts, statics, mesh, seq_axis)


@functools.partial(jax.jit, static_argnames=('opts', 'statics', 'mesh', 'seq_axis'))
def _ring_jit(call, opts, statics, mesh, seq_axis):
  p = _prepare.prepare_call(call, opts, statics)
  ring = _ring.Ring(mesh, seq_axis=seq_axis, data_axis=DATA, model_axis=MODEL)
  reasons = ring.supports(p)
  if reasons:
    raise ValueError(f'ring_attention cannot take this call: {"; ".join(reasons)}.')
  return attention.run(p, lambda p: ring)
