"""Flash attention in pure JAX: blockwise online softmax with a custom VJP.

One head at a time (``map_heads`` vmaps it). The forward walks query blocks
and, inside each, only the key blocks that the visibility value says may hold
a visible key, testing elements only in its *partial* blocks; it keeps the
rows' softmax statistics ``(m, total)`` and an accumulator in float32, and
saves the output and the statistics. The backward (FlashAttention-2) walks
key blocks and the query blocks that see them, recomputing each block of
weights from the saved statistics. Neither pass holds anything of size T·S
(except the gradient of a full ``[T, S]`` bias, which is that size).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jattn import _mods, _numerics
from jattn._heads import grouped_sinks, map_heads
from jattn._options import block_sizes
from jattn._types import Prepared
from jattn._visibility import Visibility, logits_block, pad_axis, pad_logits

# Backends where the rows of a batch whose block masks differ run in turn
# (each row visits only its own blocks). Elsewhere one vmap runs them together
# (parallel hardware wants the batch): every row then takes as many loop
# steps as the row with the most blocks.
ROWS_IN_TURN = ('cpu',)


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """Block sizes, counts and padded lengths of one head's problem."""

  bq: int
  bk: int
  q_len: int
  kv_len: int

  @property
  def nq(self) -> int:
    return -(-self.q_len // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.kv_len // self.bk)

  def pad(self, q, k, v, bias, vis: Visibility):
    """Everything padded to whole blocks; padded keys stay hidden."""
    tp, sp = self.nq * self.bq, self.nk * self.bk
    return (
      pad_axis(q, 0, tp),
      pad_axis(k, 0, sp),
      pad_axis(v, 0, sp),
      pad_logits(bias, tp, sp),
      vis.pad(tp, sp, self.kv_len),
    )


def _visit(order, partial, full, step, carry):
  """Run ``step(is_partial, block, carry)`` over the ``partial`` blocks that
  ``order`` lists first, then the ``full`` ones after them."""
  body = lambda is_partial: lambda n, c: step(is_partial, order[n], c)
  carry = lax.fori_loop(0, partial, body(True), carry)
  return lax.fori_loop(partial, partial + full, body(False), carry)


def _keep(opts, seed, vis: Visibility, r0, c0, bq: int, bk: int):
  """The block's dropout keep mask, or None without dropout."""
  if opts.dropout_rate == 0.0:
    return None
  rows, cols = vis.indices(r0, c0, bq, bk)
  return _numerics.dropout_keep(seed, rows, cols, opts.dropout_rate)


def head_plan(blocks, q, k, vis: Visibility):
  """The head's block plan (``Visibility.block_plan``) at ``blocks``, for
  ``q [T, ...]`` and ``k [S, ...]``: built once per call, visited by the
  forward (``plan.kv``) and the backward (``plan.q``)."""
  geo = _Blocks(*blocks, q.shape[0], k.shape[0])
  vis = geo.pad(q, k, k, None, vis)[-1]
  return vis.block_plan(*blocks, geo.nq, geo.nk)


def head_forward(
  opts, blocks, score_mod, q, k, v, bias, vis: Visibility, seed, sink=None, plan=None
):
  """``q [T, D], k [S, D], v [S, V] -> (out [T, V], (m [T], total [T]))``.

  ``(m, total)`` are the rows' softmax statistics (``_numerics``), the
  attention ``sink`` (a scalar logit, or None) included; a row that sees no
  key has a zero output. ``score_mod``: a ``_mods.Mod`` or None; ``plan``:
  the head's ``head_plan`` (None: built here, as a ring step does).
  """
  geo = _Blocks(*blocks, q.shape[0], k.shape[0])
  bq, bk = blocks
  q, k, v, bias, vis = geo.pad(q, k, v, bias, vis)
  k_t = k.T  # [D, S] once, so no block is transposed inside the loop

  def query_block(visits):
    i, *visits = visits
    r0 = i * bq
    q_i = lax.dynamic_slice_in_dim(q, r0, bq)

    def step(partial, j, carry):
      m, total, acc = carry
      c0 = j * bk
      k_j = lax.dynamic_slice_in_dim(k_t, c0, bk, axis=1).T
      v_j = lax.dynamic_slice_in_dim(v, c0, bk)
      s = _numerics.block_logits(
        opts,
        q_i,
        k_j,
        logits_block(bias, r0, c0, bq, bk),
        functools.partial(
          _mods.score_block, score_mod, indices=vis.mod_indices(r0, c0, bq, bk)
        ),
        vis.elements(r0, c0, bq, bk) if partial else None,
      )
      m, total, p, correction = _numerics.online_update(m, total, s)
      p = _numerics.dropout(
        p, _keep(opts, seed, vis, r0, c0, bq, bk), opts.dropout_rate
      )
      pv = _numerics.matmul('ts,sv->tv', p.astype(v.dtype), v_j)
      return m, total, acc * correction[:, None] + pv

    acc, m, total = _numerics.start(bq, v.shape[-1], sink)
    m, total, acc = _visit(*visits, step, (m, total, acc))
    return _numerics.normalize(acc, total).astype(q.dtype), (m, total)

  if plan is None:
    plan = vis.block_plan(bq, bk, geo.nq, geo.nk)
  out, stats = lax.map(query_block, (jnp.arange(geo.nq, dtype=jnp.int32), *plan.kv))
  out = out.reshape(-1, out.shape[-1])[: geo.q_len]
  return out, jax.tree.map(lambda x: x.reshape(-1)[: geo.q_len], stats)


def head_backward(
  opts,
  blocks,
  score_mod,
  q,
  k,
  v,
  bias,
  vis: Visibility,
  seed,
  out,
  stats,
  d_out,
  d_lse=None,
  plan=None,
):
  """Gradients ``(dq [T,D], dk [S,D], dv [S,V], dbias [T|1,S|1] or None,
  d score_mod params or None)``.

  ``out`` and ``stats = (m [T], total [T])`` are the final forward results for
  these rows (over all keys, when a ring splits the keys into chunks);
  ``d_lse [T]`` the cotangent of the rows' log-sum-exp, if any; ``plan``
  the forward's (None: built here).
  """
  geo = _Blocks(*blocks, q.shape[0], k.shape[0])
  bq, bk = blocks
  bias_shape = None if bias is None else bias.shape
  delta = _numerics.delta(out, d_out, d_lse)
  # The weights are exp(s - m) / total: fold 1 / total into the rows of d_out
  # and delta once, so each block uses exp(s - m) (exact for huge logits).
  m, total = stats
  inverse = _numerics.inverse_total(total)
  # (float32: 1 / total can be ~1/S, below float16's normal range)
  d_out = d_out.astype(jnp.float32) * inverse[:, None]
  delta = delta * inverse
  q, k, v, bias, vis = geo.pad(q, k, v, bias, vis)
  tp = q.shape[0]
  # Padded rows get a zero d_out and delta: they add nothing.
  d_out, delta, m = (pad_axis(x, 0, tp) for x in (d_out, delta, m))
  # Transposed copies, made once, keep every block matmul in plain NN form.
  q_t, k_t, v_t, d_out_t = q.T, k.T, v.T, d_out.T

  def key_block(carry, visits):
    j, *visits = visits
    c0 = j * bk
    k_j = lax.dynamic_slice_in_dim(k, c0, bk)
    k_t_j = lax.dynamic_slice_in_dim(k_t, c0, bk, axis=1)
    v_t_j = lax.dynamic_slice_in_dim(v_t, c0, bk, axis=1)

    def step(partial, i, inner):
      dk_t_j, dv_t_j, dq, dbias, d_params = inner
      r0 = i * bq
      row = lambda x: lax.dynamic_slice_in_dim(x, r0, bq)
      # The forward's pipeline, with the score_mod's VJP kept.
      capped = _numerics.capped_logits(opts, row(q), k_t_j.T)
      s = _numerics.finish_logits(capped, logits_block(bias, r0, c0, bq, bk))
      indices = vis.mod_indices(r0, c0, bq, bk)
      s, score_vjp = _mods.score_block_vjp(score_mod, s, indices)
      visible = vis.elements(r0, c0, bq, bk) if partial else None
      s = _numerics.finish_logits(s, visible=visible)
      p = _numerics.unnormalized(s, row(m))  # weights x row sum
      keep = _keep(opts, seed, vis, r0, c0, bq, bk)
      p_used = _numerics.dropout(p, keep, opts.dropout_rate)
      d_out_t_i = lax.dynamic_slice_in_dim(d_out_t, r0, bq, axis=1)
      dv_t_j = dv_t_j + _numerics.matmul('vt,ts->vs', d_out_t_i, p_used.astype(q.dtype))
      dp = _numerics.matmul('tv,vs->ts', row(d_out), v_t_j)
      dp = _numerics.dropout(dp, keep, opts.dropout_rate)
      ds = p * (dp - row(delta)[:, None])
      ds, d_params_ij = score_vjp(ds)
      if d_params is not None:
        d_params = jax.tree.map(
          lambda a, b: a + b.astype(a.dtype), d_params, d_params_ij
        )
      if dbias is not None:
        dbias = _accumulate_bias_grad(dbias, ds, r0, c0)
      ds = (_numerics.soft_cap_grad(opts, ds, capped) * opts.scale).astype(q.dtype)
      dq_i = row(dq) + _numerics.matmul('ts,sd->td', ds, k_j)
      dq = lax.dynamic_update_slice_in_dim(dq, dq_i, r0, axis=0)
      q_t_i = lax.dynamic_slice_in_dim(q_t, r0, bq, axis=1)
      dk_t_j = dk_t_j + _numerics.matmul('dt,ts->ds', q_t_i, ds)
      return dk_t_j, dv_t_j, dq, dbias, d_params

    dq, dbias, d_params = carry
    init = (
      jnp.zeros((k.shape[-1], bk), jnp.float32),
      jnp.zeros((v.shape[-1], bk), jnp.float32),
      dq,
      dbias,
      d_params,
    )
    dk_t_j, dv_t_j, dq, dbias, d_params = _visit(*visits, step, init)
    return (dq, dbias, d_params), (dk_t_j.T, dv_t_j.T)

  dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  dq0 = jnp.zeros((tp, q.shape[-1]), jnp.float32)
  d_params0 = None
  if score_mod is not None:
    d_params0 = jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.float32), score_mod.params
    )
  if plan is None:
    plan = vis.block_plan(bq, bk, geo.nq, geo.nk)
  (dq, dbias, d_params), (dk, dv) = lax.scan(
    key_block, (dq0, dbias0, d_params0), (jnp.arange(geo.nk, dtype=jnp.int32), *plan.q)
  )
  dk = dk.reshape(-1, dk.shape[-1])[: geo.kv_len]
  dv = dv.reshape(-1, dv.shape[-1])[: geo.kv_len]
  if dbias is not None:
    dbias = dbias[: bias_shape[0], : bias_shape[1]]
  return dq[: geo.q_len], dk, dv, dbias, d_params


def _accumulate_bias_grad(dbias, ds, r0, c0):
  """Add a block's ``ds [bq, bk]`` into ``dbias [T|1, S|1]`` (summing over a
  broadcast dim of 1)."""
  rows, cols = dbias.shape
  db = ds if rows > 1 else ds.sum(axis=0, keepdims=True)
  db = db if cols > 1 else db.sum(axis=1, keepdims=True)
  start = [
    jnp.asarray(i if n > 1 else 0, jnp.int32) for i, n in ((r0, rows), (c0, cols))
  ]
  return lax.dynamic_update_slice(
    dbias, lax.dynamic_slice(dbias, start, db.shape) + db, start
  )


def heads_last(x):
  """[B, K, G, T, X] -> [B, T, K*G, X]."""
  x = jnp.moveaxis(x, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def heads_grouped(x, num_kv):
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


def sinks_grad(sinks, stats, out, d_out, d_lse=None):
  """d loss / d sinks ``[H]`` from the per-head ``stats`` ``[B, K, G, T]``,
  ``out`` and ``d_out`` ``[B, K, G, T, V]`` (and ``d_lse [B, K, G, T]``);
  None without sinks."""
  if sinks is None:
    return None
  grouped = sinks.reshape(stats[0].shape[1], -1)[None, :, :, None]
  rows = _numerics.sink_grad(grouped, *stats, _numerics.delta(out, d_out, d_lse))
  return rows.sum(axis=(0, 3)).reshape(sinks.shape)


def score_mod_grad(score_mod, d_params):
  """The cotangent of ``score_mod`` from per-head ``d_params`` ``[B, K, G,
  ...]`` (summed, in the params' dtypes); None without a mod."""
  if score_mod is None:
    return None
  summed = [
    d.sum(axis=(0, 1, 2)).astype(x.dtype)
    for d, x in zip(d_params, score_mod.params, strict=True)
  ]
  return dataclasses.replace(score_mod, params=tuple(summed), fixed=None)


def _with_plan(head, plan):
  """``(head, per_head, per_row)`` for ``map_heads``: a plan is mapped only
  over what it depends on, so loops that do not differ are not batched:
  one for every head and row (``[nq, nk]`` orders) is closed over, one per
  row ``[B, nq, nk]`` mapped over the batch, one per head ``[B, K, G, nq,
  nk]`` over heads too."""
  rank = plan.kv.order.ndim
  if rank == 2:
    return functools.partial(head, plan=plan), (), ()
  if rank == 3:
    return head, (), (plan,)
  return head, (plan,), ()


def _shared_plan(plan, vis: Visibility):
  """``map_heads``' per-head plan ``[B, K, G, ...]`` cut to what it depends
  on (``_with_plan``)."""
  if vis.blocks_differ_by_head:
    return plan
  one_head = jax.tree.map(lambda x: x[:, 0, 0], plan)  # [B, ...]
  if vis.differs_by_row:
    return one_head
  return jax.tree.map(lambda x: x[0], one_head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(opts, blocks, in_turn, q, k, v, bias, vis, seed, sinks, score_mod, plan):
  args = (q, k, v, bias, vis, seed, sinks, score_mod, plan)
  return _flash_forward(opts, blocks, in_turn, *args)[0]


def _flash_forward(
  opts, blocks, in_turn, q, k, v, bias, vis, seed, sinks, score_mod, plan
):
  head = functools.partial(head_forward, opts, blocks, score_mod)
  sink = grouped_sinks(sinks, q.shape[0], k.shape[2]) or (None,)
  head, extra, per_row = _with_plan(head, plan)
  out, stats = map_heads(
    head,
    q,
    k,
    v,
    bias,
    vis,
    seed,
    out_axis=0,
    per_head=(*sink, *extra),
    per_row=per_row,
    rows_in_turn=in_turn,
  )
  lse = heads_last(_numerics.log_sum_exp(*stats)[..., None])[..., 0]
  residuals = (q, k, v, bias, vis, seed, sinks, score_mod, out, stats, plan)
  return (heads_last(out), lse), residuals


def _flash_backward(opts, blocks, in_turn, residuals, cotangents):
  d_out, d_lse = cotangents
  q, k, v, bias, vis, seed, sinks, score_mod, out, stats, plan = residuals
  head = functools.partial(head_backward, opts, blocks, score_mod)
  head, extra, per_row = _with_plan(head, plan)
  d_lse = heads_grouped(d_lse[..., None], k.shape[2])[..., 0]  # [B, K, G, T]
  per_head = (out, stats, heads_grouped(d_out, k.shape[2]), d_lse, *extra)
  dq, dk, dv, dbias, d_params = map_heads(
    head,
    q,
    k,
    v,
    bias,
    vis,
    seed,
    out_axis=0,
    per_head=per_head,
    per_row=per_row,
    rows_in_turn=in_turn,
  )
  dk = jnp.moveaxis(dk.sum(axis=2), 1, 2)  # [B, K, G, S, D] -> [B, S, K, D]
  dv = jnp.moveaxis(dv.sum(axis=2), 1, 2)
  dbias = None if bias is None else _reduce_bias_grad(dbias, bias)
  return (
    heads_last(dq).astype(q.dtype),
    dk.astype(k.dtype),
    dv.astype(v.dtype),
    dbias,
    None,
    None,
    sinks_grad(sinks, stats, out, *per_head[2:4]),
    score_mod_grad(score_mod, d_params),
    None,
  )


_flash.defvjp(_flash_forward, _flash_backward)


class Flash:
  """The kernel contract (see ``_registry``): takes every call."""

  name = 'flash'
  lse_gradient = True

  def supports(self, p: Prepared) -> list[str]:
    return []

  def __call__(self, p: Prepared):
    blocks = block_sizes(p.q.shape[1], p.k.shape[1], p.opts.block_sizes)
    q, opts = p.q, p.opts
    if q.dtype == jnp.float32:  # scale q once instead of every block of logits
      q = q * jnp.float32(opts.scale)
      opts = dataclasses.replace(opts, scale=1.0)
    in_turn = rows_in_turn(p, blocks)
    # The block plan, once per call: forward and backward visit it.
    tiny = p.q[..., :0], p.k[..., :0]  # map_heads reads the heads off these
    plan = map_heads(
      lambda q, k, v, bias, vis, seed: head_plan(blocks, q, k, vis),
      *tiny, tiny[1], None, p.vis, None, out_axis=0, rows_in_turn=in_turn,
    )  # fmt: skip
    plan = _shared_plan(plan, p.vis)
    out, lse = _flash(
      opts, blocks, in_turn, q, p.k, p.v, p.bias, p.vis, p.seed, p.sinks,
      p.score_mod, plan,
    )  # fmt: skip
    return out, lse


def rows_in_turn(p: Prepared, blocks) -> bool:
  """Whether the rows of ``p``'s batch run one after another, each visiting
  only its own blocks: on a backend of ``ROWS_IN_TURN``, when the rows' block
  masks may differ and there is more than one block to choose from."""
  (bq, bk), (batch, q_len), kv_len = blocks, p.q.shape[:2], p.k.shape[1]
  several_blocks = q_len > bq or kv_len > bk
  return (
    p.backend in ROWS_IN_TURN and batch > 1 and several_blocks and p.vis.differs_by_row
  )
