"""Ring attention: sequence parallelism over a mesh axis (shard_map + ppermute).

Each device keeps its chunk of queries and passes its key/value chunk around
the ring, one hop per step; partial results combine through their log-sum-exp
exactly as flash combines blocks. The backward (a custom VJP) runs the same
ring, with each key/value chunk carrying its gradient home. No device holds
more than its own chunk of the sequence plus one visiting chunk.

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

from jattn import _core, _flash, _numerics, _prepare


class _Layout:
  """Chunks and global offsets of the local shard on a ring of ``n``."""

  def __init__(self, axis: str, q_len: int, kv_len: int, zigzag: bool):
    self.axis, self.zigzag = axis, zigzag
    self.n = lax.axis_size(axis)
    self.index = lax.axis_index(axis)
    self.chunks = 2 if zigzag else 1
    self.q_chunk, self.kv_chunk = q_len // self.chunks, kv_len // self.chunks

  def offsets(self, device, chunk_len):
    """Global start of each local chunk of ``device``."""
    if not self.zigzag:
      return [device * chunk_len]
    return [device * chunk_len, (2 * self.n - 1 - device) * chunk_len]

  def pair(self, q, k, v, ctx, kv_seg, a: int, b: int):
    """``map_heads`` arguments for query chunk ``a`` against key chunk ``b``."""
    q_part = lambda x: _chunk(x, 1, a, self.q_chunk)
    kv_part = lambda x: _chunk(x, 1, b, self.kv_chunk)
    ctx = ctx._replace(q_seg=q_part(ctx.q_seg), kv_seg=kv_part(kv_seg))
    return q_part(q), kv_part(k), kv_part(v), None, None, ctx

  def rotate(self, tree):
    """Send to the next device on the ring."""
    perm = [(i, (i + 1) % self.n) for i in range(self.n)]
    return jax.tree.map(lambda x: lax.ppermute(x, self.axis, perm), tree)


def _chunk(x, axis, index, size):
  return (
    None
    if x is None
    else lax.slice_in_dim(x, index * size, (index + 1) * size, axis=axis)
  )


def _local_forward(opts, blocks, layout_args, q, k, v, ctx):
  """One device: its queries against every key/value chunk on the ring."""
  layout = _Layout(*layout_args)
  num_kv = k.shape[2]
  q_offsets = layout.offsets(layout.index, layout.q_chunk)
  out_shape = q.shape[:1] + (num_kv, q.shape[2] // num_kv)

  def step(s, carry):
    k, v, kv_seg, accs = carry
    source = (layout.index - s) % layout.n
    kv_offsets = layout.offsets(source, layout.kv_chunk)
    new_accs = []
    for a, q_off in enumerate(q_offsets):
      acc = accs[a]
      for b, kv_off in enumerate(kv_offsets):
        head = functools.partial(
          _flash.head_forward, opts, blocks, q_offset=q_off, kv_offset=kv_off
        )
        out, (m, total) = _core.map_heads(
          head, *layout.pair(q, k, v, ctx, kv_seg, a, b), out_axis=0
        )
        acc = _numerics.merge(acc, (out, m, total))
      new_accs.append(acc)
    k, v, kv_seg = layout.rotate((k, v, kv_seg))
    return k, v, kv_seg, new_accs

  init = [
    (
      jnp.zeros(out_shape + (layout.q_chunk, v.shape[-1]), jnp.float32),
      jnp.full(out_shape + (layout.q_chunk,), -jnp.inf, jnp.float32),
      jnp.zeros(out_shape + (layout.q_chunk,), jnp.float32),
    )
    for _ in q_offsets
  ]
  *_, accs = lax.fori_loop(0, layout.n, step, (k, v, ctx.kv_seg, init))
  # [B, K, G, T, V] and the rows' (m, total) [B, K, G, T]
  out, m, total = (jnp.concatenate(parts, axis=3) for parts in zip(*accs, strict=True))
  return out.astype(q.dtype), (m, total)


def _local_backward(opts, blocks, layout_args, q, k, v, ctx, out, stats, d_out):
  """One device: dq locally; dk, dv travel the ring with their chunk."""
  layout = _Layout(*layout_args)
  q_offsets = layout.offsets(layout.index, layout.q_chunk)

  def q_part(x, a):
    return jax.tree.map(lambda x: _chunk(x, 3, a, layout.q_chunk), x)

  def step(s, carry):
    k, v, kv_seg, dk, dv, dq = carry
    source = (layout.index - s) % layout.n
    kv_offsets = layout.offsets(source, layout.kv_chunk)
    dq_parts, dk_parts, dv_parts = list(dq), list(dk), list(dv)
    for a, q_off in enumerate(q_offsets):
      for b, kv_off in enumerate(kv_offsets):
        head = functools.partial(
          _flash.head_backward, opts, blocks, q_offset=q_off, kv_offset=kv_off
        )
        dq_ab, dk_ab, dv_ab, _ = _core.map_heads(
          head,
          *layout.pair(q, k, v, ctx, kv_seg, a, b),
          out_axis=0,
          per_head=(q_part(out, a), q_part(stats, a), q_part(d_out, a)),
        )
        dq_parts[a] = dq_parts[a] + dq_ab
        dk_parts[b] = dk_parts[b] + dk_ab.sum(axis=2)
        dv_parts[b] = dv_parts[b] + dv_ab.sum(axis=2)
    k, v, kv_seg, dk, dv = layout.rotate((k, v, kv_seg, dk_parts, dv_parts))
    return k, v, kv_seg, dk, dv, dq_parts

  batch, num_kv = k.shape[0], k.shape[2]
  groups = q.shape[2] // num_kv
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  chunks = range(layout.chunks)
  init = (
    k,
    v,
    ctx.kv_seg,
    [zeros(batch, num_kv, layout.kv_chunk, k.shape[-1]) for _ in chunks],
    [zeros(batch, num_kv, layout.kv_chunk, v.shape[-1]) for _ in chunks],
    [zeros(batch, num_kv, groups, layout.q_chunk, q.shape[-1]) for _ in chunks],
  )
  *_, dk, dv, dq = lax.fori_loop(0, layout.n, step, init)
  dq = _flash._heads_last(jnp.concatenate(dq, axis=3))
  dk = jnp.moveaxis(jnp.concatenate(dk, axis=2), 1, 2)  # [B, K, S, D] -> [B, S, K, D]
  dv = jnp.moveaxis(jnp.concatenate(dv, axis=2), 1, 2)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _local_ring(opts, blocks, layout_args, q, k, v, ctx):
  out, _ = _local_forward(opts, blocks, layout_args, q, k, v, ctx)
  return _flash._heads_last(out)


def _local_ring_fwd(opts, blocks, layout_args, q, k, v, ctx):
  out, stats = _local_forward(opts, blocks, layout_args, q, k, v, ctx)
  return _flash._heads_last(out), (q, k, v, ctx, out, stats)


def _local_ring_bwd(opts, blocks, layout_args, residuals, d_out):
  q, k, v, ctx, out, stats = residuals
  d_out = _flash._heads_grouped(d_out, k.shape[2])
  dq, dk, dv = _local_backward(
    opts, blocks, layout_args, q, k, v, ctx, out, stats, d_out
  )
  return dq, dk, dv, None


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


def attention(p: _prepare.Prepared, mesh, *, seq_axis, data_axis, model_axis):
  """``[B, T, H, V]`` by ring attention over ``mesh[seq_axis]``."""
  if p.bias is not None or p.mask is not None:
    raise ValueError(
      'ring attention takes no dense `mask` or `bias` (they are [T, S]); use '
      'lengths, segment ids, is_causal or local_window_size.'
    )
  n = mesh.shape[seq_axis]
  batch, q_len, heads, _ = p.q.shape
  kv_len, kv_heads = p.k.shape[1:3]
  zigzag = p.opts.is_causal
  if zigzag and q_len != kv_len:
    raise ValueError(f'causal ring attention needs T == S; got T={q_len}, S={kv_len}.')
  multiple = n * (2 if zigzag else 1)
  q_pad, kv_pad = -q_len % multiple, -kv_len % multiple
  ctx = p.ctx
  if kv_pad:  # padded keys at the end are hidden through the key lengths
    kv_len_given = ctx.kv_len if ctx.kv_len is not None else kv_len
    ctx = ctx._replace(
      kv_len=jnp.minimum(jnp.broadcast_to(jnp.asarray(kv_len_given), (batch,)), kv_len)
    )
  pad = lambda x, extra: (
    None if x is None else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
  )
  q, k, v = pad(p.q, q_pad), pad(p.k, kv_pad), pad(p.v, kv_pad)
  ctx = ctx._replace(q_seg=pad(ctx.q_seg, q_pad), kv_seg=pad(ctx.kv_seg, kv_pad))

  def divides(axis, size):
    return axis if axis in mesh.shape and size % mesh.shape[axis] == 0 else None

  b = divides(data_axis, batch)
  m = divides(model_axis, kv_heads) and divides(model_axis, heads)
  spec_bthd = P(b, seq_axis, m, None)
  ctx_specs = _core.Context(
    q_len=P(b),
    kv_len=P(b),
    q_seg=P(b, seq_axis),
    kv_seg=P(b, seq_axis),
    seed=P(b, m),
  )
  blocks = _flash.block_sizes(
    q.shape[1] // n // (2 if zigzag else 1),
    k.shape[1] // n // (2 if zigzag else 1),
    p.opts.block_sizes,
  )
  layout_args = (seq_axis, q.shape[1] // n, k.shape[1] // n, zigzag)
  ring = functools.partial(_local_ring, p.opts, blocks, layout_args)
  moves = _zigzag_moves(n)
  back = [(dst, src) for src, dst in moves]

  def local(q, k, v, ctx):
    if not zigzag:
      return ring(q, k, v, ctx)
    to_zigzag = lambda x: _move_halves(x, seq_axis, moves)
    q, k, v = to_zigzag(q), to_zigzag(k), to_zigzag(v)
    ctx = ctx._replace(q_seg=to_zigzag(ctx.q_seg), kv_seg=to_zigzag(ctx.kv_seg))
    return _move_halves(ring(q, k, v, ctx), seq_axis, back)

  out = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(spec_bthd, spec_bthd, spec_bthd, ctx_specs),
    out_specs=spec_bthd,
    check_vma=False,
  )(q, k, v, ctx)
  return out[:, :q_len]
