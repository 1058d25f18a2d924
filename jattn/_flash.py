"""Flash attention in pure JAX: blockwise online softmax with a custom VJP.

One head at a time (``map_heads`` vmaps it). The forward walks query blocks
and, inside each, only the key blocks that causal/window/length masks leave
visible, keeping a running max ``m``, sum ``total`` and accumulator in float32;
it saves the output and the log-sum-exp. The backward (FlashAttention-2)
walks key blocks and the query blocks that see them, recomputing each block
of weights from the saved log-sum-exp. Neither pass holds anything of size
T·S (except the gradient of a full ``[T, S]`` bias, which is that size).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jattn import _core, _numerics, _prepare

# Default (query, key) block sizes by backend; measured on a 2-core CPU with
# benchmarks/attention.py, where larger key blocks amortise loop overhead.
DEFAULT_BLOCKS = {'cpu': (512, 256), 'gpu': (128, 128), 'tpu': (512, 512)}


def block_sizes(q_len: int, kv_len: int, requested=None) -> tuple[int, int]:
  """Blocks for this shape and backend: the default, shrunk to the lengths."""
  if requested is not None:
    block_q, block_k = requested
    if (
      not (isinstance(block_q, int) and isinstance(block_k, int)) or min(requested) <= 0
    ):
      raise ValueError(
        f'`block_sizes` must be two positive ints (query, key); got {requested!r}.'
      )
  else:
    block_q, block_k = DEFAULT_BLOCKS.get(jax.default_backend(), (256, 256))
  round8 = lambda n: -(-n // 8) * 8
  return min(block_q, round8(q_len)), min(block_k, round8(kv_len))


def _cdiv(a, b):
  return -(-a // b)


def _pad_to(x, axis: int, size: int, value=0):
  """Pad ``axis`` of ``x`` up to ``size``."""
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _pad_logits(x, rows: int, cols: int, value=0):
  """Pad a ``[T|1, S|1]`` bias or mask; broadcast dims of 1 stay 1."""
  if x is None:
    return None
  if x.shape[0] > 1:
    x = _pad_to(x, 0, rows, value)
  return x if x.shape[1] == 1 else _pad_to(x, 1, cols, value)


def _slice_logits(x, r0, c0, bq: int, bk: int):
  """The ``[bq|1, bk|1]`` block of a ``[T|1, S|1]`` bias or mask."""
  if x is None:
    return None
  rows, cols = x.shape
  return lax.dynamic_slice(
    x,
    (r0 if rows > 1 else 0, c0 if cols > 1 else 0),
    (bq if rows > 1 else 1, bk if cols > 1 else 1),
  )


def _block_ctx(ctx: _core.Context, r0, c0, bq: int, bk: int) -> _core.Context:
  if ctx.q_seg is None:
    return ctx
  return ctx._replace(
    q_seg=lax.dynamic_slice_in_dim(ctx.q_seg, r0, bq),
    kv_seg=lax.dynamic_slice_in_dim(ctx.kv_seg, c0, bk),
  )


class _Geometry:
  """Block counts, padding and the visible block ranges of one head.

  Rows and columns have global positions ``q_offset + r`` and
  ``kv_offset + c`` (non-zero when a ring passes sequence chunks around);
  lengths in ``ctx`` are global too.
  """

  def __init__(self, opts, ctx, q_len, kv_len, blocks, q_offset=0, kv_offset=0):
    self.opts, self.ctx = opts, ctx
    self.q_len, self.kv_len = q_len, kv_len
    self.bq, self.bk = blocks
    self.nq, self.nk = _cdiv(q_len, self.bq), _cdiv(kv_len, self.bk)
    self.tp, self.sp = self.nq * self.bq, self.nk * self.bk
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def rows(self, r0):
    return self.q_offset + r0 + jnp.arange(self.bq)

  def cols(self, c0):
    return self.kv_offset + c0 + jnp.arange(self.bk)

  def kv_blocks(self, i):
    """[lo, hi) of key blocks that query block i may see."""
    r_first = self.q_offset + i * self.bq - self.kv_offset  # in local columns
    r_last = r_first + self.bq - 1
    lo, hi = 0, self.nk
    if self.opts.is_causal:
      hi = jnp.minimum(hi, r_last // self.bk + 1)
    if self.opts.window is not None:
      left, right = self.opts.window
      lo = jnp.maximum(lo, (r_first - left) // self.bk)
      hi = jnp.minimum(hi, (r_last + right) // self.bk + 1)
    if self.ctx.kv_len is not None:
      hi = jnp.minimum(hi, _cdiv(self.ctx.kv_len - self.kv_offset, self.bk))
    if self.ctx.q_len is not None:
      hi = jnp.where(self.q_offset + i * self.bq < self.ctx.q_len, hi, lo)
    return lo, jnp.maximum(lo, hi)

  def q_blocks(self, j):
    """[lo, hi) of query blocks that see key block j."""
    c_first = self.kv_offset + j * self.bk - self.q_offset  # in local rows
    c_last = c_first + self.bk - 1
    lo, hi = 0, self.nq
    if self.opts.is_causal:
      lo = jnp.maximum(lo, c_first // self.bq)
    if self.opts.window is not None:
      left, right = self.opts.window
      lo = jnp.maximum(lo, (c_first - right) // self.bq)
      hi = jnp.minimum(hi, (c_last + left) // self.bq + 1)
    if self.ctx.q_len is not None:
      hi = jnp.minimum(hi, _cdiv(self.ctx.q_len - self.q_offset, self.bq))
    if self.ctx.kv_len is not None:
      hi = jnp.where(self.kv_offset + j * self.bk < self.ctx.kv_len, hi, lo)
    return lo, jnp.maximum(lo, hi)

  def _causal_only(self):
    return self.opts.is_causal and self.opts.window is None

  def kv_split(self, i, lo, hi):
    """Key blocks [lo, mid) lie wholly below query block i's diagonal."""
    if not self._causal_only():
      return lo
    r_first = self.q_offset + i * self.bq - self.kv_offset
    return jnp.clip((r_first + 1) // self.bk, lo, hi)

  def q_split(self, j, lo, hi):
    """Query blocks [mid, hi) lie wholly below key block j's diagonal."""
    if not self._causal_only():
      return hi
    c_last = self.kv_offset + j * self.bk + self.bk - 1 - self.q_offset
    return jnp.clip(_cdiv(c_last, self.bq), lo, hi)

  def visible(self, ctx, rows, cols, mask_block, *, diagonal=True):
    """Visibility of a block; off the diagonal the causal test is skipped."""
    opts = self.opts
    if not diagonal:
      opts = dataclasses.replace(opts, is_causal=False)
    vis = _core.block_visible(opts, ctx, rows, cols, mask_block)
    if self.sp > self.kv_len:  # padded key columns
      local = cols - self.kv_offset
      vis = _core.masks.combine_masks(vis, (local < self.kv_len)[None, :])
    return vis

  def pad_inputs(self, q, k, v, bias, mask, ctx):
    pad_ctx = ctx._replace(
      q_seg=_pad_to(ctx.q_seg, 0, self.tp),
      kv_seg=_pad_to(ctx.kv_seg, 0, self.sp),
    )
    return (
      _pad_to(q, 0, self.tp),
      _pad_to(k, 0, self.sp),
      _pad_to(v, 0, self.sp),
      _pad_logits(bias, self.tp, self.sp),
      _pad_logits(mask, self.tp, self.sp, False),
      pad_ctx,
    )


def _matmul(a, b, subscripts):
  return _core.matmul(subscripts, a, b)


def _keep(opts, ctx, rows, cols):
  """The block's dropout keep mask, or None without dropout."""
  if opts.dropout_rate == 0.0:
    return None
  return _numerics.dropout_keep(ctx.seed, rows, cols, opts.dropout_rate)


def head_forward(opts, blocks, q, k, v, bias, mask, ctx, q_offset=0, kv_offset=0):
  """``q [T, D], k [S, D], v [S, V] -> (out [T, V], (m [T], total [T]))``.

  ``(m, total)`` are the rows' softmax statistics (``_numerics``); a row that
  sees no key has ``total = 0`` and a zero output.
  """
  geo = _Geometry(opts, ctx, q.shape[0], k.shape[0], blocks, q_offset, kv_offset)
  bq, bk = geo.bq, geo.bk
  q, k, v, bias, mask, ctx = geo.pad_inputs(q, k, v, bias, mask, ctx)
  k_t = k.T  # [D, S] once, so no block is transposed inside the loop

  def query_block(i):
    r0 = i * bq
    rows = geo.rows(r0)
    q_i = lax.dynamic_slice_in_dim(q, r0, bq)

    def step(diagonal, j, carry):
      m, total, acc = carry
      c0 = j * bk
      cols = geo.cols(c0)
      k_j = lax.dynamic_slice_in_dim(k_t, c0, bk, axis=1).T
      v_j = lax.dynamic_slice_in_dim(v, c0, bk)
      s = _core.block_logits(opts, q_i, k_j, _slice_logits(bias, r0, c0, bq, bk))
      block_ctx = _block_ctx(ctx, r0, c0, bq, bk)
      vis = geo.visible(
        block_ctx,
        rows,
        cols,
        _slice_logits(mask, r0, c0, bq, bk),
        diagonal=diagonal,
      )
      m, total, p, correction = _numerics.online_update(
        m, total, _numerics.hide(s, vis)
      )
      p = _numerics.dropout(p, _keep(opts, block_ctx, rows, cols), opts.dropout_rate)
      acc = acc * correction[:, None] + _matmul(p.astype(v.dtype), v_j, 'ts,sv->tv')
      return m, total, acc

    init = (*_numerics.initial_stats(bq), jnp.zeros((bq, v.shape[-1]), jnp.float32))
    lo, hi = geo.kv_blocks(i)
    mid = geo.kv_split(i, lo, hi)
    carry = lax.fori_loop(lo, mid, functools.partial(step, False), init)
    m, total, acc = lax.fori_loop(mid, hi, functools.partial(step, True), carry)
    return _numerics.normalize(acc, total).astype(q.dtype), (m, total)

  out, stats = lax.map(query_block, jnp.arange(geo.nq))
  out = out.reshape(geo.tp, -1)[: geo.q_len]
  return out, jax.tree.map(lambda x: x.reshape(geo.tp)[: geo.q_len], stats)


def head_backward(
  opts, blocks, q, k, v, bias, mask, ctx, out, stats, d_out, q_offset=0, kv_offset=0
):
  """Gradients ``(dq [T,D], dk [S,D], dv [S,V], dbias [T|1,S|1] or None)``.

  ``out`` and ``stats = (m [T], total [T])`` are the final forward results for
  these rows (over all keys, when a ring splits the keys into chunks).
  """
  geo = _Geometry(opts, ctx, q.shape[0], k.shape[0], blocks, q_offset, kv_offset)
  bq, bk = geo.bq, geo.bk
  bias_shape = None if bias is None else bias.shape
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  q, k, v, bias, mask, ctx = geo.pad_inputs(q, k, v, bias, mask, ctx)
  d_out = _pad_to(d_out, 0, geo.tp)
  delta = _pad_to(delta, 0, geo.tp)
  # Padded rows get total = 0: zero weights, like rows that see no key.
  m, total = (_pad_to(x, 0, geo.tp) for x in stats)
  # Transposed copies, made once, keep every block matmul in plain NN form.
  q_t, k_t, v_t, d_out_t = q.T, k.T, v.T, d_out.T

  def key_block(carry, j):
    c0 = j * bk
    cols = geo.cols(c0)
    k_j = lax.dynamic_slice_in_dim(k, c0, bk)
    k_t_j = lax.dynamic_slice_in_dim(k_t, c0, bk, axis=1)
    v_t_j = lax.dynamic_slice_in_dim(v_t, c0, bk, axis=1)

    def step(diagonal, i, inner):
      dk_t_j, dv_t_j, dq, dbias = inner
      r0 = i * bq
      rows = geo.rows(r0)
      q_i = lax.dynamic_slice_in_dim(q, r0, bq)
      q_t_i = lax.dynamic_slice_in_dim(q_t, r0, bq, axis=1)
      do_i = lax.dynamic_slice_in_dim(d_out, r0, bq)
      do_t_i = lax.dynamic_slice_in_dim(d_out_t, r0, bq, axis=1)
      bias_ij = _slice_logits(bias, r0, c0, bq, bk)
      capped = _core.block_logits(opts, q_i, k_t_j.T)
      s = capped if bias_ij is None else capped + bias_ij.astype(jnp.float32)
      block_ctx = _block_ctx(ctx, r0, c0, bq, bk)
      vis = geo.visible(
        block_ctx,
        rows,
        cols,
        _slice_logits(mask, r0, c0, bq, bk),
        diagonal=diagonal,
      )
      row = lambda x: lax.dynamic_slice_in_dim(x, r0, bq)
      p = _numerics.weights(_numerics.hide(s, vis), row(m), row(total))
      keep = _keep(opts, block_ctx, rows, cols)
      p_used = _numerics.dropout(p, keep, opts.dropout_rate)
      dv_t_j = dv_t_j + _matmul(do_t_i, p_used.astype(do_i.dtype), 'vt,ts->vs')
      dp = _numerics.dropout(_matmul(do_i, v_t_j, 'tv,vs->ts'), keep, opts.dropout_rate)
      ds = p * (dp - row(delta)[:, None])
      if dbias is not None:
        db = ds.sum(axis=0, keepdims=True) if bias.shape[0] == 1 else ds
        db = db.sum(axis=1, keepdims=True) if bias.shape[1] == 1 else db
        start = (r0 if bias.shape[0] > 1 else 0, c0 if bias.shape[1] > 1 else 0)
        dbias = lax.dynamic_update_slice(
          dbias, lax.dynamic_slice(dbias, start, db.shape) + db, start
        )
      if opts.soft_cap is not None:
        ds = ds * (1.0 - jnp.square(capped / opts.soft_cap))
      ds = (ds * opts.scale).astype(q.dtype)
      dq_i = lax.dynamic_slice_in_dim(dq, r0, bq) + _matmul(ds, k_j, 'ts,sd->td')
      dq = lax.dynamic_update_slice_in_dim(dq, dq_i, r0, axis=0)
      dk_t_j = dk_t_j + _matmul(q_t_i, ds, 'dt,ts->ds')
      return dk_t_j, dv_t_j, dq, dbias

    dq, dbias = carry
    init = (
      jnp.zeros((k.shape[-1], bk), jnp.float32),
      jnp.zeros((v.shape[-1], bk), jnp.float32),
      dq,
      dbias,
    )
    lo, hi = geo.q_blocks(j)
    mid = geo.q_split(j, lo, hi)
    inner = lax.fori_loop(lo, mid, functools.partial(step, True), init)
    dk_t_j, dv_t_j, dq, dbias = lax.fori_loop(
      mid, hi, functools.partial(step, False), inner
    )
    return (dq, dbias), (dk_t_j.T, dv_t_j.T)

  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  dq0 = jnp.zeros((geo.tp, q.shape[-1]), jnp.float32)
  (dq, dbias), (dk, dv) = lax.scan(key_block, (dq0, dbias0), jnp.arange(geo.nk))
  dk = dk.reshape(geo.sp, -1)[: geo.kv_len]
  dv = dv.reshape(geo.sp, -1)[: geo.kv_len]
  if dbias is not None:
    dbias = dbias[: bias_shape[0], : bias_shape[1]]
  return dq[: geo.q_len], dk, dv, dbias


def _heads_last(x):
  """[B, K, G, T, X] -> [B, T, K*G, X]."""
  x = jnp.moveaxis(x, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _heads_grouped(x, num_kv):
  """[B, T, H, X] -> [B, K, G, T, X]."""
  x = x.reshape(x.shape[:2] + (num_kv, -1) + x.shape[3:])
  return jnp.moveaxis(x, 1, 3)


def _reduce_bias_grad(dbias, bias):
  """Per-head [B, K, G, T|1, S|1] -> the shape of bias [B|1, H|1, T|1, S|1]."""
  dbias = dbias.reshape(dbias.shape[:1] + (-1,) + dbias.shape[3:])
  if bias.shape[0] == 1:
    dbias = dbias.sum(axis=0, keepdims=True)
  if bias.shape[1] == 1:
    dbias = dbias.sum(axis=1, keepdims=True)
  return dbias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(opts, blocks, q, k, v, bias, mask, ctx):
  return _flash_forward(opts, blocks, q, k, v, bias, mask, ctx)[0]


def _flash_forward(opts, blocks, q, k, v, bias, mask, ctx):
  head = functools.partial(head_forward, opts, blocks)
  out, stats = _core.map_heads(head, q, k, v, bias, mask, ctx, out_axis=0)
  lse = _heads_last(_numerics.log_sum_exp(*stats)[..., None])[..., 0]
  return (_heads_last(out), lse), (q, k, v, bias, mask, ctx, out, stats)


def _flash_backward(opts, blocks, residuals, cotangents):
  d_out, _ = cotangents  # the log-sum-exp is returned without a gradient
  q, k, v, bias, mask, ctx, out, stats = residuals
  num_kv = k.shape[2]
  head = functools.partial(head_backward, opts, blocks)
  dq, dk, dv, dbias = _core.map_heads(
    head,
    q,
    k,
    v,
    bias,
    mask,
    ctx,
    out_axis=0,
    per_head=(out, stats, _heads_grouped(d_out, num_kv)),
  )
  dk = jnp.moveaxis(dk.sum(axis=2), 1, 2)  # [B, K, G, S, D] -> [B, S, K, D]
  dv = jnp.moveaxis(dv.sum(axis=2), 1, 2)
  dbias = None if bias is None else _reduce_bias_grad(dbias, bias)
  return (
    _heads_last(dq).astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    dbias,
    None,
    None,
  )


_flash.defvjp(_flash_forward, _flash_backward)


def attention(p: _prepare.Prepared, requested_blocks=None):
  """``(out [B, T, H, V], lse [B, T, H] float32)`` by flash attention."""
  blocks = block_sizes(p.q.shape[1], p.k.shape[1], requested_blocks)
  q, opts = p.q, p.opts
  if q.dtype == jnp.float32:  # scale q once instead of every block of logits
    q = q * jnp.float32(opts.scale)
    opts = dataclasses.replace(opts, scale=1.0)
  out, lse = _flash(opts, blocks, q, p.k, p.v, p.bias, p.mask, p.ctx)
  return out, lax.stop_gradient(lse)
