"""Every kernel against an independent float64 oracle (``helpers.
oracle_attention``: plain NumPy, nothing of jattn), for what the kernels
share and so cannot check against each other: the logits pipeline's order
(scale, soft-cap, bias, score_mod, masks), sinks, offsets, per-element
mods, and the blocks flash visits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _call, _options, _prepare
from jattn._heads import map_heads
from jattn._types import FULL, HIDDEN
from tests import helpers

B, T, S, H = 2, 13, 11, 4
SCALE, CAP = 0.7, 1.5
SLOPES = np.array([0.5, 0.25, -0.3, 0.1])
SINKS = np.array([0.4, -1.0, 2.5, -np.inf])
Q_OFFSETS, LENGTHS = np.array([3, 0]), np.array([11, 6])


def slope_score(score, b, h, q_idx, kv_idx):
  """A score_mod whose effect depends on the logit (so its place in the
  pipeline matters: before the soft-cap it would be capped)."""
  return score * (1.0 + SLOPES[h]) + SLOPES[h] * (kv_idx - q_idx)


def striped(b, h, q_idx, kv_idx):
  return (q_idx * 7 + kv_idx * 3 + h + b) % 5 != 0


def numpy_visible():
  """Causal at the query offsets, key lengths, and the striped mod."""
  b, h, i, j = np.indices((B, H, T, S))
  p = i + Q_OFFSETS[b]
  return (j <= p) & (j < LENGTHS[b]) & striped(b, h, p, j)


def test_every_kernel_equals_the_oracle():
  q, k, v = helpers.qkv(0, q_len=T, kv_len=S)
  bias = jax.random.normal(jax.random.key(1), (B, H, T, S))
  slopes = jnp.asarray(SLOPES, jnp.float32)
  options = dict(
    scale=SCALE,
    logits_soft_cap=CAP,
    is_causal=True,
    q_offsets=jnp.asarray(Q_OFFSETS),
    key_value_seq_lengths=jnp.asarray(LENGTHS),
    mask_mod=striped,
    score_mod=lambda score, b, h, q_idx, kv_idx: (
      score * (1.0 + slopes[h]) + slopes[h] * (kv_idx - q_idx).astype(jnp.float32)
    ),
    sinks=jnp.asarray(SINKS, jnp.float32),
  )

  def score(logits, b, h, i, j):
    return slope_score(logits, b, h, i + Q_OFFSETS[b], j)

  out, weights = helpers.oracle_attention(
    q, k, v, scale=SCALE, soft_cap=CAP, bias=bias, score=score,
    visible=numpy_visible(), sinks=SINKS,
  )  # fmt: skip
  # The sinks took their share (none for head 3's -inf); empty rows are 0.
  sums, seen = weights.sum(-1), numpy_visible().any(-1)
  assert (sums[:, :3][seen[:, :3]] < 0.999).all()
  np.testing.assert_allclose(sums[:, 3][seen[:, 3]], 1.0)
  np.testing.assert_array_equal(sums[~seen], 0.0)
  for implementation in ('reference', 'flash', 'decode'):
    got = jattn.dot_product_attention(
      q, k, v, bias, implementation=implementation, block_sizes=(8, 8), **options
    )
    np.testing.assert_allclose(got, out, atol=2e-5, rtol=2e-5, err_msg=implementation)
  np.testing.assert_allclose(
    jattn.attention_weights(q, k, bias, **options), weights, atol=2e-6, rtol=2e-5
  )


@pytest.mark.parametrize('implementation', ['reference', 'flash'])
def test_rules_at_offsets_equal_the_oracle(implementation):
  # Window, chunk and prefix compare positions; lengths count rows.
  q, k, v = helpers.qkv(2, q_len=T, kv_len=S)
  kv_offsets, prefix = np.array([0, 4]), np.array([5, 0])
  b, _, i, j = np.indices((B, H, T, S))
  p, p_k = i + Q_OFFSETS[b], j + kv_offsets[b]
  visible = ((p_k <= p) | (p_k < prefix[b])) & (p - 6 <= p_k) & (p_k <= p + 1)
  visible &= (p // 9 == p_k // 9) & (j < LENGTHS[b])
  out, _ = helpers.oracle_attention(q, k, v, scale=8**-0.5, visible=visible)
  got = jattn.dot_product_attention(
    q, k, v, is_causal=True, prefix_lengths=jnp.asarray(prefix),
    local_window_size=(6, 1), attention_chunk_size=9,
    q_offsets=jnp.asarray(Q_OFFSETS), kv_offsets=jnp.asarray(kv_offsets),
    key_value_seq_lengths=jnp.asarray(LENGTHS), implementation=implementation,
    block_sizes=(8, 8),
  )  # fmt: skip
  np.testing.assert_allclose(got, out, atol=2e-5, rtol=2e-5)


def test_flash_visits_exactly_the_blocks_that_hold_a_visible_key():
  # Documents of each row, causal: the blocks flash visits (its states) are
  # those of the NumPy mask: none without a visible key, no test where every
  # key is visible.
  t = s = 32
  docs = np.array([[0] * 9 + [1] * 15 + [2] * 8, [0] * 20 + [1] * 12])
  q, k, v = helpers.qkv(3, q_len=t, kv_len=s)
  mod = jattn.mods.document_mask(jnp.asarray(docs))
  block_mask = jattn.create_block_mask(mod, B, None, t, s, block_sizes=(8, 8))
  call, opts, statics = _call.split_call(
    dict(
      query=q, key=k, value=v, is_causal=True, block_mask=block_mask, block_sizes=(8, 8)
    ),
    strict=True,
  )
  p = _prepare.prepare_call(call, opts, statics)
  bq, bk = _options.block_sizes(t, s, p.opts.block_sizes)

  def head(q, k, v, bias, vis, seed):
    return vis.block_states(bq, bk, t // bq, s // bk)

  states = np.asarray(map_heads(head, p.q, p.k, p.v, None, p.vis, None, out_axis=0))
  for row in range(B):
    visible = (docs[row][:, None] == docs[row][None, :]) & np.tri(t, dtype=bool)
    blocks = visible.reshape(t // bq, bq, s // bk, bk)
    some, every = blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))
    for head_states in states[row].reshape(-1, t // bq, s // bk):
      np.testing.assert_array_equal(head_states != HIDDEN, some)
      np.testing.assert_array_equal(head_states == FULL, every)
  assert (states == HIDDEN).sum() > states.size / 3  # rows skip different blocks
  out, _ = helpers.oracle_attention(
    q, k, v, scale=8**-0.5,
    visible=((docs[:, :, None] == docs[:, None, :]) & np.tri(t, dtype=bool))[:, None],
  )  # fmt: skip
  got = jattn.dot_product_attention(q, k, v, is_causal=True, block_mask=block_mask)
  np.testing.assert_allclose(got, out, atol=2e-5, rtol=2e-5)
