"""Programmable attention: mask_mod, score_mod, block masks and ready mods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import sharding, testing
from jattn._types import FULL, HIDDEN, PARTIAL
from jattn._visibility import Visibility
from tests import helpers

T, S = 13, 11  # odd lengths: the kernels pad to whole blocks of 8
TABLE = jnp.linspace(-1.0, 1.0, 2 * 32)


def gather_score(table):
  """A score_mod reading a relative-position table (gradients to the table)."""
  return lambda score, b, h, q_idx, kv_idx: (
    score + table[q_idx - kv_idx + 32] * (h + 1).astype(jnp.float32)
  )


def striped(b, h, q_idx, kv_idx):
  """A mask_mod that depends on every index."""
  return (q_idx * 7 + kv_idx * 3 + h + b) % 5 != 0


def dense(mod, batch, heads, q_len, kv_len, q_offset=0, kv_offset=0):
  """``[B, H, T, S]`` of a mask_mod, element by element (the oracle)."""
  b, h, q, kv = np.meshgrid(
    np.arange(batch),
    np.arange(heads),
    np.arange(q_len) + q_offset,
    np.arange(kv_len) + kv_offset,
    indexing='ij',
  )
  flat = jax.vmap(mod)(*(jnp.asarray(x.reshape(-1), jnp.int32) for x in (b, h, q, kv)))
  return np.asarray(flat).reshape(b.shape)


FEATURES = {  # each with a mask_mod, a score_mod and sinks (combined: suite time)
  'causal at offsets, dropout': dict(
    is_causal=True,
    q_offsets=jnp.array([4, 0]),
    kv_offsets=jnp.array([0, 2]),
    dropout_rate=0.3,
    dropout_rng=jax.random.key(5),
  ),
  'lengths, window': dict(
    key_value_seq_lengths=jnp.array([0, 7]), local_window_size=(3, 2)
  ),
}


@pytest.mark.parametrize('feature', sorted(FEATURES), ids=str)
def test_flash_matches_the_reference(feature):
  """Values and gradients of q, k, v, sinks and the score_mod's table; GQA."""
  q, k, v = helpers.qkv(0, q_len=T, kv_len=S)
  options = FEATURES[feature]

  def attend(implementation):
    def fn(q, k, v, sinks, table):
      return jattn.dot_product_attention(
        q, k, v, sinks=sinks, mask_mod=striped, score_mod=gather_score(table),
        implementation=implementation, block_sizes=(8, 8), **options,
      )  # fmt: skip

    return fn

  sinks = jnp.array([0.5, -1.0, 2.0, -0.3])
  testing.assert_functions_agree(
    attend('reference'), attend('flash'), q, k, v, sinks, TABLE, argnums=(0, 1, 2, 3, 4)
  )


def test_ring_matches_the_reference():
  """Global indices in every ring step (zig-zag causal, offsets, a block
  mask): values and gradients, the table's included."""
  q, k, v = helpers.qkv(1, q_len=T, kv_len=T)
  mesh = sharding.make_mesh({'data': 2, 'model': 2, 'seq': 2})
  options = dict(is_causal=True, q_offsets=jnp.array([3, 0]), block_sizes=(8, 8))

  def reference(q, k, v, table):
    return jattn.dot_product_attention(
      q, k, v, mask_mod=striped, score_mod=gather_score(table),
      implementation='reference', **options,
    )  # fmt: skip

  # The ring honours a block mask (its mod, at every step's global indices).
  block_mask = jattn.create_block_mask(striped, 2, 4, T, T, block_sizes=(8, 8))

  def ring(q, k, v, table):
    return sharding.ring_attention(
      q, k, v, mesh=mesh, block_mask=block_mask, score_mod=gather_score(table),
      **options,
    )  # fmt: skip

  testing.assert_functions_agree(reference, ring, q, k, v, TABLE, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize('implementation', ['reference', 'flash'])
def test_mask_mod_equals_the_same_dense_mask(implementation):
  q, k, v = helpers.qkv(2, q_len=T, kv_len=S)
  offsets = dict(q_offsets=jnp.array([2, 5]), kv_offsets=jnp.array([1, 0]))
  mask = np.stack([
    dense(striped, 2, 4, T, S, q_offset=o, kv_offset=ko)[b]
    for b, (o, ko) in enumerate([(2, 1), (5, 0)])
  ])  # fmt: skip
  run = lambda **kw: jattn.dot_product_attention(
    q, k, v, implementation=implementation, block_sizes=(8, 8), **offsets, **kw
  )
  testing.assert_trees_close(
    run(mask_mod=striped), run(mask=jnp.asarray(mask)), q.dtype
  )


def test_mods_are_handed_only_real_rows_and_columns():
  # A ring step's padded block: rows past T and columns past S are clamped to
  # the last real one before the offsets are added.
  vis = Visibility(q_size=5, kv_size=3, q_start=jnp.int32(4), q_offsets=jnp.int32(10))
  _, _, q_idx, kv_idx = vis.mod_indices(0, 0, 4, 8)
  np.testing.assert_array_equal(q_idx, [14, 14, 14, 14])
  np.testing.assert_array_equal(kv_idx, [0, 1, 2, 2, 2, 2, 2, 2])
  # End to end: tables of exactly T and S entries, NaN when read outside.
  q, k, v = helpers.qkv(3, q_len=T, kv_len=S)

  def loss(q, k, v, rows, cols):
    def mod(score, b, h, q_idx, kv_idx):
      outside = dict(mode='fill', fill_value=jnp.nan)
      return score + rows.at[q_idx].get(**outside) + cols.at[kv_idx].get(**outside)

    out = jattn.dot_product_attention(q, k, v, score_mod=mod, block_sizes=(8, 8))
    return jnp.sum(out)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, jnp.zeros(T), jnp.zeros(S))
  assert all(np.isfinite(g).all() for g in grads)


def brute_states(mod, batch, heads, q_len, kv_len, bq, bk):
  """Block states from the dense mask, over each block's real elements."""
  mask = dense(mod, batch, heads, q_len, kv_len)
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  states = np.empty((batch, heads, nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      block = mask[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
      some, every = block.any(axis=(2, 3)), block.all(axis=(2, 3))
      states[:, :, i, j] = np.where(some, np.where(every, FULL, PARTIAL), HIDDEN)
  return states


DOCS = jnp.array([[0] * 9 + [1] * 12 + [2] * 4, [0] * 2 + [1] * 20 + [2] * 3])
MASK_MODS = {
  'causal': lambda b, h, q_idx, kv_idx: kv_idx <= q_idx,
  'documents': jattn.mods.document_mask(DOCS),
  'window per head': lambda b, h, q_idx, kv_idx: jnp.abs(q_idx - kv_idx) <= 2 + 4 * h,
  'striped': striped,
}


@pytest.mark.parametrize('name', sorted(MASK_MODS), ids=str)
def test_create_block_mask_equals_brute_force(name):
  mod = MASK_MODS[name]
  block_mask = jattn.create_block_mask(mod, 2, 3, 25, 25, block_sizes=(8, 8))
  assert block_mask.block_sizes == (8, 8) and block_mask.shape == (2, 3, 25, 25)
  np.testing.assert_array_equal(
    block_mask.states, brute_states(mod, 2, 3, 25, 25, 8, 8)
  )


def test_block_mask_gives_the_mask_mods_result_and_skips():
  q, k, v = helpers.qkv(4, q_len=25, kv_len=25)
  mod = jattn.mods.document_mask(DOCS)
  block_mask = jattn.create_block_mask(mod, 2, None, 25, 25, block_sizes=(8, 8))
  assert float(block_mask.sparsity()) > 0.3

  def with_block_mask(q, k, v):
    return jattn.dot_product_attention(q, k, v, is_causal=True, block_mask=block_mask)

  def with_segments(q, k, v):
    return jattn.dot_product_attention(
      q, k, v, is_causal=True, q_segment_ids=DOCS, implementation='reference'
    )

  testing.assert_functions_agree(with_segments, with_block_mask, q, k, v)


def test_block_mask_built_under_jit_from_runtime_documents():
  q, k, v = helpers.qkv(5, q_len=25, kv_len=25)

  @jax.jit
  def attend(q, k, v, docs):
    mod = lambda b, h, q_idx, kv_idx: docs[b, q_idx] == docs[b, kv_idx]
    block_mask = jattn.create_block_mask(mod, 2, None, 25, 25, block_sizes=(8, 8))
    return jattn.dot_product_attention(q, k, v, block_mask=block_mask)

  expected = jattn.dot_product_attention(q, k, v, q_segment_ids=DOCS)
  testing.assert_trees_close(attend(q, k, v, DOCS), expected, q.dtype)


def test_alibi_slopes_are_the_papers():
  eight = [2.0**-i for i in range(1, 9)]
  np.testing.assert_allclose(jattn.mods.alibi_slopes(8), eight)
  # 12 heads: the 8 slopes of 8 heads, then 4 of 16 heads' odd ones.
  twelve = eight + [2.0 ** -(i + 0.5) for i in range(4)]
  np.testing.assert_allclose(jattn.mods.alibi_slopes(12), twelve, rtol=1e-6)
  assert jattn.mods.alibi_slopes(1).tolist() == [2.0**-8]


@pytest.mark.parametrize('symmetric', [False, True])
def test_alibi_equals_its_dense_bias_in_values_and_gradients(symmetric):
  q, k, v = helpers.qkv(6, q_len=T, kv_len=S)
  slopes = jnp.asarray(jattn.mods.alibi_slopes(4))
  distance = (jnp.arange(S)[None, :] - jnp.arange(T)[:, None]).astype(jnp.float32)

  def biased(q, k, v, slopes):
    bias = slopes[:, None, None] * (-jnp.abs(distance) if symmetric else distance)[None]
    return jattn.dot_product_attention(
      q, k, v, bias, is_causal=True, implementation='reference'
    )

  def modded(q, k, v, slopes):
    mod = jattn.mods.alibi(slopes, symmetric=symmetric)
    return jattn.dot_product_attention(
      q, k, v, is_causal=True, score_mod=mod, block_sizes=(8, 8)
    )

  testing.assert_functions_agree(biased, modded, q, k, v, slopes, argnums=(0, 1, 2, 3))


def test_relative_position_bias_table_gets_its_gradient():
  q, k, v = helpers.qkv(7, q_len=T, kv_len=S)
  table = jax.random.normal(jax.random.key(8), (8, 4))
  buckets = jattn.mods.relative_position_buckets(
    jnp.arange(S)[None, :] - jnp.arange(T)[:, None],
    8,
    bidirectional=True,
    max_distance=6,
  )  # [T, S]
  assert buckets.min() == 0 and buckets.max() == 7

  def biased(q, k, v, table):
    bias = jnp.moveaxis(table[buckets], -1, 0)  # [H, T, S]
    return jattn.dot_product_attention(q, k, v, bias, implementation='reference')

  def modded(q, k, v, table):
    mod = jattn.mods.relative_position_bias(table, max_distance=6)
    return jattn.dot_product_attention(q, k, v, score_mod=mod, block_sizes=(8, 8))

  testing.assert_functions_agree(biased, modded, q, k, v, table, argnums=(0, 1, 2, 3))


def test_document_mask_with_global_tokens():
  q, k, v = helpers.qkv(9, q_len=25, kv_len=25)
  first = jnp.broadcast_to(jnp.arange(25) == 0, (2, 25))
  mod = jattn.mods.document_mask(DOCS, q_global=first)
  same = DOCS[:, :, None] == DOCS[:, None, :]
  mask = same | first[:, :, None] | first[:, None, :]
  run = lambda **kw: jattn.dot_product_attention(q, k, v, block_sizes=(8, 8), **kw)
  testing.assert_trees_close(run(mask_mod=mod), run(mask=mask[:, None]), q.dtype)


def test_a_mod_defined_once_compiles_once():
  q, k, v = helpers.qkv(10)
  mod = jattn.mods.alibi(jattn.mods.alibi_slopes(4))
  attend = lambda mod: jattn.dot_product_attention(q, k, v, score_mod=mod)
  helpers.compilations(attend, mod)
  assert helpers.compilations(attend, mod) == 0
  # A Partial's arrays are operands: new slopes, same compiled call.
  assert helpers.compilations(attend, jattn.mods.alibi(jnp.ones(4))) == 0


BAD_MODS = {
  'mask_mod returns a float': (
    dict(mask_mod=lambda b, h, q, kv: (q - kv).astype(jnp.float32)),
    TypeError,
    '`mask_mod` must return a bool scalar.*float32',
  ),
  'mask_mod returns a vector': (
    dict(mask_mod=lambda b, h, q, kv: jnp.array([True, False])),
    TypeError,
    '`mask_mod` must return a bool scalar.*bool\\[2\\]',
  ),
  'score_mod changes dtype': (
    dict(score_mod=lambda s, b, h, q, kv: s.astype(jnp.bfloat16)),
    TypeError,
    '`score_mod` must return a float32 scalar.*bfloat16',
  ),
  'score_mod changes shape': (
    dict(score_mod=lambda s, b, h, q, kv: jnp.stack([s, s])),
    TypeError,
    '`score_mod` must return a float32 scalar',
  ),
  'score_mod of the wrong arity': (
    dict(score_mod=lambda s, q, kv: s),
    TypeError,
    '`score_mod` must take 5 positional arguments \\(score, b, h, q_idx, kv_idx\\)',
  ),
  'mask_mod not callable': (dict(mask_mod=3), TypeError, '`mask_mod` must be callable'),
  'block mask not a BlockMask': (
    dict(block_mask=jnp.zeros((1, 1, 1, 1))),
    TypeError,
    '`block_mask` must be a jattn.BlockMask',
  ),
}


@pytest.mark.parametrize('name', sorted(BAD_MODS), ids=str)
def test_bad_mods_are_clear_errors(name):
  q, k, v = helpers.qkv(11)
  options, error, match = BAD_MODS[name]
  with pytest.raises(error, match=match):
    jattn.dot_product_attention(q, k, v, **options)


def test_block_mask_for_another_call_is_refused():
  q, k, v = helpers.qkv(12, q_len=16, kv_len=16)
  causal = MASK_MODS['causal']
  other_rows = jattn.create_block_mask(causal, 3, None, 16, 16)
  with pytest.raises(ValueError, match=r'built for \(B, H, T, S\) = \(3, 1, 16, 16\)'):
    jattn.dot_product_attention(q, k, v, block_mask=other_rows)
  # Other lengths are no error: where its states do not reach, the mod is
  # tested element by element.
  shorter = jattn.create_block_mask(causal, None, None, 16, 8, block_sizes=(8, 8))
  testing.assert_trees_close(
    jattn.dot_product_attention(q, k, v, block_mask=shorter, implementation='flash'),
    jattn.dot_product_attention(q, k, v, is_causal=True),
    q.dtype,
  )
  block_mask = jattn.create_block_mask(causal, None, None, 16, 16, block_sizes=(8, 8))
  with pytest.raises(ValueError, match='both given with different mods'):
    jattn.dot_product_attention(q, k, v, block_mask=block_mask, mask_mod=striped)
  with pytest.raises(ValueError, match=r"'xla' cannot take.*mask_mod"):
    jattn.dot_product_attention(q, k, v, mask_mod=causal, implementation='xla')
  with pytest.raises(ValueError, match=r"'xla' cannot take.*score_mod"):
    jattn.dot_product_attention(
      q, k, v, score_mod=gather_score(TABLE), implementation='xla'
    )


def test_values_match_torch_flex_attention():
  torch = pytest.importorskip('torch')
  flex = pytest.importorskip('torch.nn.attention.flex_attention')
  q, k, v = helpers.qkv(13, q_len=32, kv_len=32, kv_heads=4)
  slopes = jattn.mods.alibi_slopes(4)
  docs = jnp.broadcast_to(jnp.repeat(jnp.arange(4), 8), (2, 32))
  torch_docs = torch.as_tensor(np.array(docs))
  torch_slopes = torch.as_tensor(slopes)
  causal = flex.create_block_mask(
    lambda b, h, q, kv: kv <= q, None, None, 32, 32, device='cpu'
  )
  same_doc = lambda b, h, q, kv: torch_docs[b, q] == torch_docs[b, kv]
  documents = flex.create_block_mask(same_doc, 2, None, 32, 32, device='cpu')
  torch_alibi = lambda s, b, h, q, kv: s + torch_slopes[h] * (kv - q)
  cases = [
    (dict(score_mod=jattn.mods.alibi(slopes), is_causal=True),
     dict(score_mod=torch_alibi, block_mask=causal)),
    (dict(mask_mod=jattn.mods.document_mask(docs)), dict(block_mask=documents)),
  ]  # fmt: skip
  as_torch = lambda x: torch.as_tensor(np.asarray(x)).transpose(1, 2)  # [B, H, T, D]
  for ours, theirs in cases:
    expected = flex.flex_attention(as_torch(q), as_torch(k), as_torch(v), **theirs)
    out = jattn.dot_product_attention(q, k, v, **ours)
    np.testing.assert_allclose(
      out, expected.transpose(1, 2).numpy(), atol=2e-5, rtol=1e-4
    )


def test_create_block_mask_never_builds_t_by_s():
  # T = S = 4096: [T, S] bools are 16 MiB; one query block of every key,
  # evaluated in turn, is 512 x 4096.
  from jattn.block_mask import _states

  t = 4096
  static, leaves = jattn._mods.split(striped)
  compiled = _states.lower(leaves, static, (1, 1, t, t), (512, 256)).compile()
  assert testing.temp_bytes(compiled) < t * t / 4


def test_mods_keep_flash_memory_linear():
  # Forward + backward with a score_mod, a mask_mod and sinks: temp memory
  # grows with T, not T·S (as without mods: tests/test_flash.py).
  from tests.test_flash import flash_grad_temp_bytes

  mods = dict(
    score_mod=jattn.mods.alibi(jattn.mods.alibi_slopes(2)),
    mask_mod=striped,
    sinks=jnp.zeros(2),
  )
  small, large = (
    flash_grad_temp_bytes(2048, **mods),
    flash_grad_temp_bytes(4096, **mods),
  )
  assert large <= 2.2 * small, (small, large)
  assert large < 4096 * 4096 * 4 / 4  # a [T, S] float32 buffer


def test_and_or_masks_and_block_masks_combine_to_the_mask_they_describe():
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2] * 3])  # [1, 24]
  documents = jattn.mods.document_mask(ids)
  causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
  striped = lambda b, h, q_idx, kv_idx: (kv_idx + h) % 3 != 0  # by head
  for combine, logical in (
    (jattn.mods.and_masks, np.logical_and),
    (jattn.mods.or_masks, np.logical_or),
  ):
    joined = combine(documents, causal, striped)
    expected = logical(
      logical(dense(documents, 1, 2, 24, 24), dense(causal, 1, 2, 24, 24)),
      dense(striped, 1, 2, 24, 24),
    )
    np.testing.assert_array_equal(dense(joined, 1, 2, 24, 24), expected)
  # Block masks: & and | give the states of the joined mod, and flash with
  # them equals the reference with the dense mask.
  q, k, v = helpers.qkv(3, batch=(1,), q_len=24, kv_len=24, heads=2, kv_heads=1)
  make = lambda mod: jattn.create_block_mask(mod, 1, 2, 24, 24, block_sizes=(8, 8))
  for op, combine in (('&', jattn.mods.and_masks), ('|', jattn.mods.or_masks)):
    a, b = make(documents), make(striped)
    joined = a & b if op == '&' else a | b
    built = make(combine(documents, striped))
    np.testing.assert_array_equal(joined.states, built.states, err_msg=op)
    mask = jnp.asarray(dense(joined.mask_mod, 1, 2, 24, 24))
    out = jattn.dot_product_attention(
      q, k, v, block_mask=joined, implementation='flash'
    )
    expected = jattn.dot_product_attention(
      q, k, v, mask=mask, implementation='reference'
    )
    testing.assert_trees_close(out, expected, jnp.float32)
  with pytest.raises(ValueError, match='same T, S and block sizes'):
    _ = make(causal) & jattn.create_block_mask(causal, 1, 2, 24, 16)
  with pytest.raises(TypeError, match='argument 1 is not a function'):
    jattn.mods.and_masks(causal, 3)


def test_a_block_mask_converts_to_the_call_s_block_sizes():
  causal = MASK_MODS['causal']
  fine = jattn.create_block_mask(causal, None, 2, 40, 36, block_sizes=(8, 4))
  # To multiples: the states of a mask built at those sizes.
  coarse = jattn.create_block_mask(causal, None, 2, 40, 36, block_sizes=(16, 12))
  np.testing.assert_array_equal(fine.to_block_sizes((16, 12)).states, coarse.states)
  # To sizes that are no multiples: safe, and the call takes them.
  q, k, v = helpers.qkv(13, q_len=40, kv_len=36, heads=2, kv_heads=1)
  out = jattn.dot_product_attention(
    q, k, v, block_mask=fine, block_sizes=(24, 16), implementation='flash'
  )
  expected = jattn.dot_product_attention(
    q, k, v, mask_mod=causal, implementation='reference'
  )
  testing.assert_trees_close(out, expected, jnp.float32)
  odd = fine.to_block_sizes((24, 16)).states
  assert odd.shape == (1, 2, 2, 3) and (odd == HIDDEN).any() and (odd == FULL).any()


# (q_len, kv_len, q_offset, kv_offset, kernel blocks, aligned with the mask's)
READ_AT = {
  'rows 8-23, coarser key blocks': (16, 48, 8, 0, (8, 16), True),
  'a decode step (one row)': (1, 48, 37, 0, (1, 8), False),
  'misaligned offsets and blocks': (12, 20, 5, 3, (8, 8), False),
  'a ring step (16 rows from 24)': (16, 24, 24, 24, (8, 8), True),
  'partly past the mask': (16, 16, 32, 40, (8, 8), False),
}


@pytest.mark.parametrize('case', sorted(READ_AT), ids=str)
def test_a_block_mask_is_read_at_the_call_s_positions_and_blocks(case):
  """The states a kernel reads at its own blocks and the call's positions
  equal brute force where the blocks align, and never call a block hidden
  or full that is not, where they do not."""
  q_len, kv_len, q_offset, kv_offset, (bq, bk), aligned = READ_AT[case]
  mod = MASK_MODS['window per head']
  block_mask = jattn.create_block_mask(mod, None, 2, 40, 48, block_sizes=(8, 8))
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  expected = np.empty((2, nq, nk), np.int8)
  mask = dense(mod, 1, 2, q_len, kv_len, q_offset, kv_offset)[0]
  for i in range(nq):
    for j in range(nk):
      block = mask[:, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
      some, every = block.any(axis=(1, 2)), block.all(axis=(1, 2))
      expected[:, i, j] = np.where(some, np.where(every, FULL, PARTIAL), HIDDEN)
  for h in range(2):
    vis = Visibility(
      q_size=q_len, kv_size=kv_len, mod_grid=block_mask.grid,
      q_offsets=jnp.int32(q_offset), kv_offsets=jnp.int32(kv_offset),
      mask_mod=mod, mod_blocks=block_mask.states[0, h],
    )  # fmt: skip
    got = np.asarray(vis.block_states(bq, bk, nq, nk))
    assert not np.any((got == HIDDEN) & (expected[h] != HIDDEN))
    assert not np.any((got == FULL) & (expected[h] != FULL))
    if aligned:
      np.testing.assert_array_equal(got, expected[h])
  assert (got == HIDDEN).any() or not aligned  # the lookup skips something
