"""JAX's TPU splash kernel behind jattn's semantics, run in Pallas interpret
mode on the CPU: values and gradients against the reference, zeros for rows
that see nothing, runtime masks without recompiling, and what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import testing
from tests import helpers

T, S = 200, 260  # two query and three key tiles of 128, both padded
UNSORTED_Q = jnp.stack([jnp.arange(T) // 70, jnp.arange(T) * 7 % 3])
UNSORTED_KV = jnp.stack([jnp.arange(S) // 90, jnp.arange(S) * 5 % 3])
DOCS = jnp.stack([jnp.arange(S) // 64, jnp.arange(S) // 100])

FEATURES = {  # combined: suite time (each compiles a few seconds)
  'causal at offsets, soft-cap, sinks, empty rows': dict(
    is_causal=True,
    q_offsets=jnp.array([60, -150]),  # row 1's first 150 rows see nothing
    kv_offsets=jnp.array([0, 3]),
    logits_soft_cap=5.0,
  ),
  'unsorted segments, lengths, window, chunk': dict(
    q_segment_ids=UNSORTED_Q,
    kv_segment_ids=UNSORTED_KV,
    query_seq_lengths=jnp.array([150, 0]),
    key_value_seq_lengths=jnp.array([260, 100]),
    local_window_size=(50, 10),
    attention_chunk_size=64,
  ),
  # Rules its mask function cannot say: the sequence's element tiles.
  'a block mask (its mask_mod), prefix-LM, chunk at key offsets': dict(
    block_mask=jattn.create_block_mask(
      jattn.mods.document_mask(DOCS), 2, None, T, S, block_sizes=(64, 64)
    ),
    is_causal=True,
    prefix_lengths=jnp.array([40, 0]),
    attention_chunk_size=96,
    kv_offsets=jnp.array([5, 0]),
  ),
}
SINKS = jnp.array([0.5, -jnp.inf, 1.0, jnp.inf])


@pytest.mark.parametrize('feature', sorted(FEATURES), ids=str)
def test_splash_matches_the_reference(feature):
  q, k, v = helpers.qkv(0, q_len=T, kv_len=S, head_dim=32, value_dim=16)
  options = FEATURES[feature]
  sinks = SINKS if 'sinks' in feature else None

  def attend(implementation):
    def run(q, k, v, sinks):
      return jattn.dot_product_attention(
        q, k, v, sinks=sinks, implementation=implementation, **options
      )

    return run

  argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
  testing.assert_functions_agree(
    attend('reference'), attend('splash'), q, k, v, sinks, argnums=argnums
  )
  out = attend('splash')(q, k, v, sinks)
  assert np.isfinite(out).all()
  if 'empty rows' in feature:
    np.testing.assert_array_equal(out[1, :150], 0.0)


def test_splash_in_bfloat16():
  q, k, v = helpers.qkv(1, q_len=T, kv_len=T, dtype=jnp.bfloat16)
  run = lambda implementation: jattn.dot_product_attention(
    q, k, v, is_causal=True, implementation=implementation
  )
  out = run('splash')
  assert out.dtype == jnp.bfloat16
  testing.assert_trees_close(out, run('reference'), jnp.bfloat16)


def test_new_runtime_masks_need_no_new_compilation():
  q, k, v = helpers.qkv(2, q_len=T, kv_len=T)

  @jax.jit
  def attend(q, k, v, ids, offsets):
    return jattn.dot_product_attention(
      q, k, v, q_segment_ids=ids, q_offsets=offsets, is_causal=True,
      implementation='splash',
    )  # fmt: skip

  ids = jnp.broadcast_to(jnp.arange(T) // 50, (2, T))
  attend(q, k, v, ids, jnp.array([0, 7]))
  other_ids, other_offsets = ids[:, ::-1], jnp.array([130, -3])
  assert helpers.compilations(attend, q, k, v, other_ids, other_offsets) == 0
  expected = jattn.dot_product_attention(
    q, k, v, q_segment_ids=other_ids, q_offsets=other_offsets, is_causal=True,
    implementation='reference',
  )  # fmt: skip
  testing.assert_trees_close(
    attend(q, k, v, other_ids, other_offsets), expected, jnp.float32
  )


REFUSED = {
  'a bias': (dict(bias=jnp.zeros((1, 1, 8, 8))), 'a bias'),
  'a mask per head': (dict(mask=jnp.ones((1, 4, 8, 8), bool)), 'differs by head'),
  'a mask_mod that reads h': (
    dict(mask_mod=lambda b, h, q, k: k <= q + h),
    'differs by head',
  ),
  'dropout': (
    dict(dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=False),
    'dropout',
  ),
  'a score_mod': (dict(score_mod=lambda s, b, h, q, k: s), 'a score_mod'),
  'return_residual': (dict(return_residual=True), 'return_residual'),
}


@pytest.mark.parametrize('case', sorted(REFUSED), ids=str)
def test_splash_refuses_what_it_cannot_express(case):
  q, k, v = helpers.qkv(3, q_len=8, kv_len=8)
  options, reason = REFUSED[case]
  with pytest.raises(ValueError, match=rf"'splash' cannot take.*{reason}"):
    jattn.dot_product_attention(q, k, v, implementation='splash', **options)


def test_float64_is_refused_with_x64():
  with jax.enable_x64(True):
    q, k, v = helpers.qkv(4, q_len=8, kv_len=8, dtype=jnp.float64)
    with pytest.raises(ValueError, match='float64 inputs'):
      jattn.dot_product_attention(q, k, v, implementation='splash')
