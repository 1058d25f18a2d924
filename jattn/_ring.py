"""Ring attention: sequence parallelism over a mesh axis (shard_map + ppermute).

Each device keeps its chunk of queries and passes its key/value chunk around
the ring, one hop per step. Every step is the flash kernel on one pair of
chunks, with the visibility value shifted to the chunks' global positions, so
causal, window, chunk, prefix and length rules (and their block skipping) are
the same as in one call on the whole sequence. Partial results merge by
``_numerics.merge``. The backward (a custom VJP) runs the same ring, with each
key/value chunk carrying its gradient home. No device holds more than its own
chunk of the sequence plus one visiting chunk.

Causal attention is load-balanced by zig-zag order: with n devices the
sequence is cut into 2n chunks and device d holds chunks d and 2n-1-d, so
every device does the same work at every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jattn import _flash, _numerics, _options
from jattn._heads import map_heads
from jattn._types import Prepared
from jattn._visibility import pad_axis


class _Layout:
  """Chunks of the local shard on a ring of ``n``, and where they start."""

  def __init__(self, axis: str, q_len: int, kv_len: int, zigzag: bool):
    self.axis, self.zigzag = axis, zigzag
    self.n = lax.axis_size(axis)
    self.index = lax.axis_index(axis)
    self.chunks = 2 if zigzag else 1
    self.q_chunk, self.kv_chunk = q_len // self.chunks, kv_len // self.chunks

  def starts(self, device, chunk_len):
    """Where in the sequence each local chunk of ``device`` starts."""
    if not self.zigzag:
      return [device * chunk_len]
    return [device * chunk_len, (2 * self.n - 1 - device) * chunk_len]

  def pairs(self, source):
    """``(a, q_start, b, kv_start)`` for each local query chunk ``a`` and
    each chunk ``b`` of the key/value shard that came from ``source``."""
    for a, q_start in enumerate(self.starts(self.index, self.q_chunk)):
      for b, kv_start in enumerate(self.starts(source, self.kv_chunk)):
        yield a, q_start, b, kv_start

  def pair(self, q, k, v, vis, visiting, a, q_start, b, kv_start):
    """``map_heads`` arguments for query chunk ``a`` against key chunk ``b``
    (``visiting``: the per-key arrays that travel with ``k``, ``v``)."""
    q_part = lambda x: _chunk(x, 1, a, self.q_chunk)
    kv_part = lambda x: _chunk(x, 1, b, self.kv_chunk)
    vis = vis.map_arrays(rows=q_part).replace(
      **{name: kv_part(x) for name, x in visiting.items()},
      q_start=jnp.asarray(q_start, jnp.int32),
      kv_start=jnp.asarray(kv_start, jnp.int32),
    )
    return q_part(q), kv_part(k), kv_part(v), None, vis

  def rotate(self, tree):
    """Send to the next device on the ring."""
    perm = [(i, (i + 1) % self.n) for i in range(self.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, self.axis, perm), tree)


def _chunk(x, axis, index, size):
  if x is None:
    return None
  return lax.slice_in_dim(x, index * size, (index + 1) * size, axis=axis)


def _local_forward(opts, blocks, layout_args, q, k, v, vis, seed, sinks, score_mod):
  """One device: its queries against every key/value chunk on the ring (the
  sinks, if any, start each row's statistics)."""
  layout = _Layout(*layout_args)
  num_kv = k.shape[2]
  out_shape = q.shape[:1] + (num_kv, q.shape[2] // num_kv)

  def step(s, carry):
    k, v, visiting, accs = carry
    accs = list(accs)
    for a, q_off, b, kv_off in layout.pairs((layout.index - s) % layout.n):
      head = functools.partial(_flash.head_forward, opts, blocks, score_mod)
      args = layout.pair(q, k, v, vis, visiting, a, q_off, b, kv_off)
      out, (m, total) = map_heads(head, *args, seed, out_axis=0)
      accs[a] = _numerics.merge(accs[a], (out, m, total))
    k, v, visiting = layout.rotate((k, v, visiting))
    return k, v, visiting, accs

  rows = out_shape + (layout.q_chunk,)
  sink = None if sinks is None else sinks.reshape(1, num_kv, -1, 1)
  init = [_numerics.start(rows, v.shape[-1], sink)] * layout.chunks
  *_, accs = lax.fori_loop(0, layout.n, step, (k, v, vis.arrays_of('cols'), init))
  # [B, K, G, T, V] and the rows' (m, total) [B, K, G, T]
  out, m, total = (jnp.concatenate(parts, axis=3) for parts in zip(*accs, strict=True))
  return out.astype(q.dtype), (m, total)


def _local_backward(
  opts, blocks, layout_args, q, k, v, vis, seed, score_mod, out, stats, d_out
):
  """One device: dq (and the score_mod's d params) locally; dk, dv travel the
  ring with their chunk."""
  layout = _Layout(*layout_args)
  q_part = lambda x, a: jax.tree.map(lambda x: _chunk(x, 3, a, layout.q_chunk), x)

  def step(s, carry):
    k, v, visiting, dk, dv, dq, d_params = carry
    dq, dk, dv = list(dq), list(dk), list(dv)
    for a, q_off, b, kv_off in layout.pairs((layout.index - s) % layout.n):
      head = functools.partial(_flash.head_backward, opts, blocks, score_mod)
      dq_ab, dk_ab, dv_ab, _, d_params_ab = map_heads(
        head,
        *layout.pair(q, k, v, vis, visiting, a, q_off, b, kv_off),
        seed,
        out_axis=0,
        per_head=(q_part(out, a), q_part(stats, a), q_part(d_out, a)),
      )
      dq[a] = dq[a] + dq_ab
      dk[b] = dk[b] + dk_ab.sum(axis=2)
      dv[b] = dv[b] + dv_ab.sum(axis=2)
      if d_params is not None:
        d_params = jax.tree.map(
          lambda a, b: a + b.sum(axis=(0, 1, 2)), d_params, d_params_ab
        )
    k, v, visiting, dk, dv = layout.rotate((k, v, visiting, dk, dv))
    return k, v, visiting, dk, dv, dq, d_params

  batch, num_kv = k.shape[0], k.shape[2]
  groups = q.shape[2] // num_kv
  zeros = lambda *shape: [jnp.zeros(shape, jnp.float32)] * layout.chunks
  init = (
    k,
    v,
    vis.arrays_of('cols'),
    zeros(batch, num_kv, layout.kv_chunk, k.shape[-1]),
    zeros(batch, num_kv, layout.kv_chunk, v.shape[-1]),
    zeros(batch, num_kv, groups, layout.q_chunk, q.shape[-1]),
    None
    if score_mod is None
    else tuple(jnp.zeros(x.shape, jnp.float32) for x in score_mod.params),
  )
  *_, dk, dv, dq, d_params = lax.fori_loop(0, layout.n, step, init)
  dq = _flash.heads_last(jnp.concatenate(dq, axis=3))
  dk = jnp.moveaxis(jnp.concatenate(dk, axis=2), 1, 2)  # [B, K, S, D] -> [B, S, K, D]
  dv = jnp.moveaxis(jnp.concatenate(dv, axis=2), 1, 2)
  grads = dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
  return grads, d_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _local_ring(opts, blocks, layout_args, q, k, v, vis, seed, sinks, score_mod):
  args = (q, k, v, vis, seed, sinks, score_mod)
  return _local_ring_fwd(opts, blocks, layout_args, *args)[0]


def _local_ring_fwd(opts, blocks, layout_args, q, k, v, vis, seed, sinks, score_mod):
  args = (q, k, v, vis, seed, sinks, score_mod)
  out, stats = _local_forward(opts, blocks, layout_args, *args)
  lse = _flash.heads_last(_numerics.log_sum_exp(*stats)[..., None])[..., 0]
  return (_flash.heads_last(out), lse), (*args, out, stats)


def _local_ring_bwd(opts, blocks, layout_args, residuals, cotangents):
  d_out, _ = cotangents  # the log-sum-exp is returned without a gradient
  q, k, v, vis, seed, sinks, score_mod, out, stats = residuals
  d_out = _flash.heads_grouped(d_out, k.shape[2])
  grads, d_params = _local_backward(
    opts, blocks, layout_args, q, k, v, vis, seed, score_mod, out, stats, d_out
  )
  # This device's share of the replicated sinks' and score_mod's gradients:
  # shard_map sums the shares.
  d_sinks = _flash.sinks_grad(sinks, stats, out, d_out)
  d_mod = None
  if score_mod is not None:
    d_mod = _flash.score_mod_grad(score_mod, [d[None, None, None] for d in d_params])
  return (*grads, None, None, d_sinks, d_mod)


_local_ring.defvjp(_local_ring_fwd, _local_ring_bwd)


def _move_halves(x, axis: str, moves):
  """Permute half-chunks between devices: ``moves`` maps (device, half) to
  (device, half), over the sequence axis 1 of the local ``x``."""
  if x is None:
    return None
  halves = jnp.split(x, 2, axis=1)
  out = [jnp.zeros_like(halves[0]), jnp.zeros_like(halves[0])]
  for src_half in (0, 1):
    for dst_half in (0, 1):
      perm = [
        (sd, dd) for (sd, sh), (dd, dh) in moves if sh == src_half and dh == dst_half
      ]
      if perm:
        out[dst_half] = out[dst_half] + lax.ppermute(halves[src_half], axis, perm)
  return jnp.concatenate(out, axis=1)


def _zigzag_moves(n: int):
  """Contiguous layout (chunk c on device c // 2) -> device d holds d, 2n-1-d."""
  moves = []
  for c in range(2 * n):
    target = (c, 0) if c < n else (2 * n - 1 - c, 1)
    moves.append(((c // 2, c % 2), target))
  return moves


def visibility_specs(vis, data, model, seq):
  """The PartitionSpec of each array of ``vis`` by its kind (``ARRAYS``):
  sequences over ``data``, heads over ``model``, positions over ``seq`` too;
  each shard then holds the global batch and head indices of its part."""
  along = lambda spec: lambda _: spec
  return vis.map_arrays(
    blocks=lambda x: P(
      *(None if n == 1 else a for a, n in ((data, x.shape[0]), (model, x.shape[1])))
    ),
    sequence=along(P(data)),
    heads=along(P(model)),
    rows=along(P(data, seq)),
    cols=along(P(data, seq)),
    shared=along(P()),
  )


class Ring:
  """Ring attention over ``mesh[seq_axis]`` behind the kernel contract (see
  ``_registry``); batch and heads also split over the mesh's data and model
  axes when they divide B and both H and K."""

  name = 'ring'

  def __init__(self, mesh, *, seq_axis: str, data_axis: str, model_axis: str):
    self.mesh, self.seq_axis = mesh, seq_axis
    self.data_axis, self.model_axis = data_axis, model_axis

  def supports(self, p: Prepared) -> list[str]:
    reasons = []
    if self.seq_axis not in self.mesh.shape:
      reasons.append(
        f'a mesh without the sequence axis {self.seq_axis!r} (axes: '
        f'{tuple(self.mesh.shape)})'
      )
    if p.bias is not None or p.vis.mask is not None:
      reasons.append(
        'a dense `mask` or `bias` ([T, S] is not sequence-shardable; use '
        'lengths, segment ids, prefixes, chunks, windows or is_causal)'
      )
    if p.opts.is_causal and p.q.shape[1] != p.k.shape[1]:
      reasons.append(
        f'causal attention with T={p.q.shape[1]} != S={p.k.shape[1]} (the '
        'zig-zag order needs T == S)'
      )
    return reasons

  def __call__(self, p: Prepared):
    mesh, seq_axis = self.mesh, self.seq_axis
    n = mesh.shape[seq_axis]
    batch, q_len, heads, _ = p.q.shape
    kv_len, kv_heads = p.k.shape[1:3]
    zigzag = p.opts.is_causal
    chunks = n * (2 if zigzag else 1)
    q_size, kv_size = -(-q_len // chunks) * chunks, -(-kv_len // chunks) * chunks
    # Padded keys lie past the visibility's kv_size (S): hidden everywhere.
    q, k, v = (
      pad_axis(p.q, 1, q_size),
      pad_axis(p.k, 1, kv_size),
      pad_axis(p.v, 1, kv_size),
    )
    # A block mask's states are looked up at each step's chunk positions.
    vis = p.vis.map_arrays(
      rows=lambda x: pad_axis(x, 1, q_size), cols=lambda x: pad_axis(x, 1, kv_size)
    )

    def divides(axis, size):
      return axis if axis in mesh.shape and size % mesh.shape[axis] == 0 else None

    b = divides(self.data_axis, batch)
    m = divides(self.model_axis, kv_heads) and divides(self.model_axis, heads)
    spec_bthd = P(b, seq_axis, m, None)
    spec = lambda x, s: None if x is None else s
    vis_specs = visibility_specs(vis, b, m, seq_axis)
    blocks = _options.block_sizes(
      q_size // chunks, kv_size // chunks, p.opts.block_sizes
    )
    layout_args = (seq_axis, q_size // n, kv_size // n, zigzag)
    ring = functools.partial(_local_ring, p.opts, blocks, layout_args)
    moves = _zigzag_moves(n)
    back = [(dst, src) for src, dst in moves]

    def local(q, k, v, vis, seed, sinks, score_mod):
      if not zigzag:
        return ring(q, k, v, vis, seed, sinks, score_mod)
      to_zigzag = lambda x: _move_halves(x, seq_axis, moves)
      q, k, v = to_zigzag(q), to_zigzag(k), to_zigzag(v)
      vis = vis.map_arrays(rows=to_zigzag, cols=to_zigzag)
      out, lse = ring(q, k, v, vis, seed, sinks, score_mod)
      from_zigzag = lambda x: _move_halves(x, seq_axis, back)
      return from_zigzag(out), from_zigzag(lse)

    out, lse = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(
        spec_bthd,
        spec_bthd,
        spec_bthd,
        vis_specs,
        spec(p.seed, P(b, m)),
        spec(p.sinks, P(m)),
        spec(p.score_mod, P()),
      ),
      out_specs=(spec_bthd, P(b, seq_axis, m)),
      check_vma=False,
    )(q, k, v, vis, p.seed, p.sinks, p.score_mod)
    return out[:, :q_len], lax.stop_gradient(lse[:, :q_len])
