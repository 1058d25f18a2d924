"""The visibility value: its block ranges against its own elements, and the
new rules (chunked and prefix-LM attention) in every kernel."""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import sharding, testing
from jattn._visibility import Visibility
from tests import helpers


def dense(vis, t, s):
  visible = vis.elements(0, 0, t, s)
  return np.ones((t, s), bool) if visible is None else np.broadcast_to(visible, (t, s))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
  t=st.integers(1, 40),
  s=st.integers(1, 40),
  bq=st.sampled_from([4, 8]),
  bk=st.sampled_from([4, 8, 16]),
  causal=st.booleans(),
  window=st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
  chunk=st.one_of(st.none(), st.integers(1, 12)),
  prefix=st.one_of(st.none(), st.integers(0, 20)),
  q_len=st.one_of(st.none(), st.integers(0, 40)),
  kv_len=st.one_of(st.none(), st.integers(0, 40)),
  starts=st.tuples(st.integers(0, 16), st.integers(0, 16)),
  offsets=st.tuples(st.integers(0, 24), st.integers(0, 24)),
  segments=st.sampled_from([None, 'sorted', 'unsorted']),
  mask=st.sampled_from([None, 'random', 'block diagonal', 'rows', 'columns']),
  seed=st.integers(0, 2**16),
)
def test_block_ranges_agree_with_elements(
  t,
  s,
  bq,
  bk,
  causal,
  window,
  chunk,
  prefix,
  q_len,
  kv_len,
  starts,
  offsets,
  segments,
  mask,
  seed,
):
  """Blocks outside [lo, hi) hold no visible element; blocks in
  [full_lo, full_hi) are visible throughout; both directions; a ring step's
  starts, the caller's position offsets, segment ids (sorted as packed
  documents, or not) and dense masks included."""
  rng = np.random.default_rng(seed)
  q_seg = kv_seg = None
  if segments is not None:
    q_seg, kv_seg = rng.integers(0, 3, t), rng.integers(0, 3, s)
    if segments == 'sorted':
      q_seg, kv_seg = np.sort(q_seg), np.sort(kv_seg)
  dense_mask = {
    None: None,
    'random': rng.random((t, s)) < 0.5,
    'block diagonal': (np.arange(t)[:, None] // 8) == (np.arange(s)[None, :] // 8),
    'rows': rng.random((t, 1)) < 0.7,
    'columns': rng.random((1, s)) < 0.7,
  }[mask]
  as_array = lambda x: None if x is None else jnp.asarray(x)
  vis = Visibility(
    is_causal=causal,
    window=window,
    chunk_size=chunk,
    kv_size=starts[1] + s - 3,  # the last keys are a ring's padding
    kv_extent=s - 1,  # and the very last a kernel's
    q_len=None if q_len is None else jnp.asarray(q_len),
    kv_len=None if kv_len is None else jnp.asarray(kv_len),
    prefix=None if prefix is None or not causal else jnp.asarray(prefix),
    q_start=jnp.asarray(starts[0]),
    kv_start=jnp.asarray(starts[1]),
    q_offset=jnp.asarray(offsets[0]),
    kv_offset=jnp.asarray(offsets[1]),
    q_seg=as_array(q_seg),
    kv_seg=as_array(kv_seg),
    mask=as_array(dense_mask),
  )
  nq, nk = -(-t // bq), -(-s // bk)
  visible = np.zeros((nq * bq, nk * bk), bool)
  visible[:t, :s] = dense(vis, t, s)
  blocks = visible.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)  # [nq, nk, bq, bk]
  kv_ranges = np.stack(jax.vmap(lambda i: vis.kv_blocks(i, bq, bk, nk))(jnp.arange(nq)))
  q_ranges = np.stack(jax.vmap(lambda j: vis.q_blocks(j, bq, bk, nq))(jnp.arange(nk)))
  for i in range(nq):
    lo, full_lo, full_hi, hi = kv_ranges[:, i]
    assert 0 <= lo <= full_lo <= full_hi <= hi <= nk
    rows = min(bq, t - i * bq)
    for j in range(nk):
      if not lo <= j < hi:
        assert not blocks[i, j].any(), (i, j)
      if full_lo <= j < full_hi:
        assert blocks[i, j, :rows, : min(bk, s - j * bk)].all(), (i, j)
  for j in range(nk):
    lo, full_lo, full_hi, hi = q_ranges[:, j]
    assert 0 <= lo <= full_lo <= full_hi <= hi <= nq
    for i in range(nq):
      if not lo <= i < hi:
        assert not blocks[i, j].any(), (i, j)
      if full_lo <= i < full_hi:
        assert blocks[i, j, : min(bq, t - i * bq), : min(bk, s - j * bk)].all()


def chunk_mask(t, s, size):
  return (np.arange(t)[:, None] // size) == (np.arange(s)[None, :] // size)


def prefix_mask(t, s, prefixes):
  causal = np.arange(t)[:, None] >= np.arange(s)[None, :]
  inside = np.arange(s)[None, None, :] < np.asarray(prefixes)[:, None, None]
  return (causal[None] | inside)[:, None]  # [B, 1, T, S]


@pytest.mark.parametrize('causal', [False, True])
def test_chunked_attention_is_its_mask(causal):
  q, k, v = helpers.qkv(1, q_len=19, kv_len=19)
  mask = chunk_mask(19, 19, 5) & (np.tri(19, dtype=bool) if causal else True)
  expected = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  for implementation in (None, 'flash', 'reference'):
    got = jattn.dot_product_attention(
      q, k, v, attention_chunk_size=5, is_causal=causal, implementation=implementation
    )
    testing.assert_trees_close(got, expected, jnp.float32)


def test_prefix_lm_is_its_mask():
  q, k, v = helpers.qkv(2, q_len=13, kv_len=13)
  prefixes = jnp.array([4, 0])
  expected = jax.nn.dot_product_attention(q, k, v, mask=prefix_mask(13, 13, prefixes))
  for implementation in (None, 'flash', 'reference'):
    got = jattn.dot_product_attention(
      q, k, v, is_causal=True, prefix_lengths=prefixes, implementation=implementation
    )
    testing.assert_trees_close(got, expected, jnp.float32)


COMBINATIONS = {
  'chunk': dict(attention_chunk_size=7),
  'chunk causal': dict(attention_chunk_size=7, is_causal=True),
  'chunk causal lengths': dict(
    attention_chunk_size=6,
    is_causal=True,
    query_seq_lengths=jnp.array([29, 11]),
    key_value_seq_lengths=jnp.array([20, 31]),
  ),
  'chunk window': dict(attention_chunk_size=16, local_window_size=(5, 2)),
  'chunk segments': dict(
    attention_chunk_size=9,
    q_segment_ids=jnp.repeat(
      jnp.array([[0, 1, 2], [0, 0, 1]]), jnp.array([9, 13, 9]), axis=1
    ),
  ),
  'prefix': dict(is_causal=True, prefix_lengths=jnp.array([12, 3])),
  'prefix lengths': dict(
    is_causal=True,
    prefix_lengths=jnp.array([30, 9]),
    key_value_seq_lengths=jnp.array([25, 31]),
  ),
  'prefix window': dict(
    is_causal=True, prefix_lengths=jnp.array([10, 17]), local_window_size=(6, 0)
  ),
  'prefix chunk segments': dict(
    is_causal=True,
    prefix_lengths=jnp.array([5, 20]),
    attention_chunk_size=12,
    q_segment_ids=jnp.repeat(jnp.array([[0, 1], [3, 3]]), jnp.array([14, 17]), axis=1),
  ),
}


@pytest.mark.parametrize('name', sorted(COMBINATIONS))
def test_flash_matches_reference_values_and_grads(name):
  q, k, v = helpers.qkv(3, q_len=31, kv_len=31, heads=4, kv_heads=2)
  testing.assert_implementations_agree(
    q,
    k,
    v,
    implementations=('reference', 'flash'),
    block_sizes=(8, 8),
    **COMBINATIONS[name],
  )


def test_gradient_receptive_field_of_a_prefix():
  """Output row i depends on key j iff j <= i or j < prefix."""
  q, k, v = helpers.qkv(4, batch=(1,), q_len=12, kv_len=12, heads=1, kv_heads=1)
  f = lambda k: jattn.dot_product_attention(
    q, k, v, is_causal=True, prefix_lengths=jnp.array([5]), block_sizes=(4, 4)
  )
  for i in (2, 7):
    grad = jax.grad(lambda k, i=i: f(k)[0, i].sum())(k)
    touched = np.asarray(jnp.abs(grad[0, :, 0]).sum(-1) > 0)
    np.testing.assert_array_equal(touched, (np.arange(12) <= i) | (np.arange(12) < 5))


@pytest.mark.parametrize(
  'mesh_shape, options',
  [
    ({'data': 2, 'seq': 2}, dict(is_causal=True, attention_chunk_size=6)),
    ({'seq': 2}, dict(is_causal=True, prefix_lengths=jnp.array([5, 15]))),
  ],
  ids=['chunked causal', 'prefix'],
)
def test_ring_matches_reference(mesh_shape, options):
  mesh = sharding.make_mesh(
    mesh_shape, devices=jax.devices()[: np.prod(list(mesh_shape.values()))]
  )
  q, k, v = helpers.qkv(5, q_len=21, kv_len=21, heads=4, kv_heads=2)
  testing.assert_functions_agree(
    lambda q, k, v: sharding.ring_attention(
      q, k, v, mesh=mesh, block_sizes=(8, 8), **options
    ),
    lambda q, k, v: jattn.dot_product_attention(
      q, k, v, implementation='reference', **options
    ),
    q,
    k,
    v,
  )


def test_new_options_are_checked():
  q, k, v = helpers.qkv(6)
  with pytest.raises(ValueError, match='attention_chunk_size'):
    jattn.dot_product_attention(q, k, v, attention_chunk_size=0)
  with pytest.raises(ValueError, match=r'prefix_lengths.*is_causal'):
    jattn.dot_product_attention(q, k, v, prefix_lengths=jnp.array([1, 2]))
  with pytest.raises(ValueError, match='prefix_lengths'):
    jattn.dot_product_attention(q, k, v, is_causal=True, prefix_lengths=jnp.array([1]))
  with pytest.raises(ValueError, match=r"'xla' cannot take.*attention_chunk_size"):
    jattn.dot_product_attention(q, k, v, attention_chunk_size=2, implementation='xla')


def test_xla_refuses_a_rule_it_was_not_taught():
  # supports() is an allow-list: a rule added to Visibility later is a
  # reason for the xla kernel, never silently dropped.
  from jattn import _prepare, _registry

  q, k, v = helpers.qkv(0)
  arrays, opts = _prepare.split_arguments({'is_causal': True})
  p = _prepare.prepare(q, k, v, None, None, arrays, None, opts)
  xla = _registry.KERNELS['xla']
  assert xla.supports(p) == []
  with_rule = dataclasses.make_dataclass(
    'WithRule', [('new_rule', object, None)], bases=(Visibility,), frozen=True
  )
  vis = with_rule(
    **{f.name: getattr(p.vis, f.name) for f in dataclasses.fields(Visibility)}
  )
  assert xla.supports(p._replace(vis=vis.replace(new_rule=1))) == ['new_rule']


@pytest.mark.parametrize('impl', ['reference', 'flash'])
@pytest.mark.parametrize(
  'rules',
  [
    dict(is_causal=True),
    dict(is_causal=True, local_window_size=(7, 0)),
    dict(attention_chunk_size=8),
    dict(is_causal=True, prefix_lengths=jnp.array([12, 20])),
  ],
  ids=['causal', 'window', 'chunk', 'prefix'],
)
def test_offsets_place_a_slice_where_it_stands_in_the_whole(impl, rules):
  # Queries 17..28 and keys 10..39 of each sequence, told their positions,
  # get the rows (and gradients) the whole sequence gives them.
  q, k, v = helpers.qkv(0, q_len=40, kv_len=40)
  rows, cols = slice(17, 29), slice(10, 40)
  offsets = dict(q_offsets=jnp.array([17, 17]), kv_offsets=jnp.array([10, 10]))

  def whole(q, k, v):
    # Hide keys 0..9 to compare with the slice that lacks them.
    keys_from_10 = (jnp.arange(40) >= 10)[None, None, None, :]
    out = jattn.dot_product_attention(
      q, k, v, mask=keys_from_10, implementation='reference', **rules
    )
    return out[:, rows]

  def part(q, k, v):
    return jattn.dot_product_attention(
      q[:, rows],
      k[:, cols],
      v[:, cols],
      implementation=impl,
      block_sizes=(8, 8),
      **offsets,
      **rules,
    )

  testing.assert_functions_agree(part, whole, q, k, v)


def test_offsets_per_sequence_decode_step_and_lengths():
  # One new token per sequence at its own position p against a cache whose
  # keys 0..S-1 sit at positions 0..S-1: it sees keys 0..p (and lengths
  # count cached keys from the first, not positions).
  q, k, v = helpers.qkv(1, q_len=1, kv_len=24)
  p = jnp.array([5, 17])
  out = jattn.dot_product_attention(q, k, v, is_causal=True, q_offsets=p)
  mask = (jnp.arange(24)[None, :] <= p[:, None])[:, None, None, :]
  expected = jattn.dot_product_attention(q, k, v, mask=mask, implementation='reference')
  testing.assert_trees_close(out, expected, jnp.float32)
  lengths = jattn.dot_product_attention(
    q, k, v, is_causal=True, q_offsets=p, key_value_seq_lengths=jnp.array([3, 24])
  )
  mask = mask & (jnp.arange(24)[None, :] < jnp.array([3, 24])[:, None])[:, None, None]
  expected = jattn.dot_product_attention(q, k, v, mask=mask, implementation='reference')
  testing.assert_trees_close(lengths, expected, jnp.float32)


def test_ring_adds_its_chunk_starts_to_the_offsets():
  q, k, v = helpers.qkv(2, q_len=40, kv_len=40)
  options = dict(
    is_causal=True,
    local_window_size=(9, 0),
    q_offsets=jnp.array([3, 30]),
    kv_offsets=jnp.array([0, 25]),
  )
  testing.assert_functions_agree(
    lambda q, k, v: sharding.ring_attention(
      q,
      k,
      v,
      mesh=sharding.make_mesh({'seq': 4}, devices=jax.devices()[:4]),
      block_sizes=(8, 8),
      **options,
    ),
    lambda q, k, v: jattn.dot_product_attention(
      q, k, v, implementation='reference', **options
    ),
    q,
    k,
    v,
  )


def test_offsets_are_checked_and_refused_by_xla():
  q, k, v = helpers.qkv(0)
  with pytest.raises(TypeError, match='`q_offsets` must have an integer dtype'):
    jattn.dot_product_attention(q, k, v, q_offsets=jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r'`kv_offsets` must have shape \[B\.\.\.\]'):
    jattn.dot_product_attention(q, k, v, kv_offsets=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"'xla' cannot take.*q_offsets"):
    jattn.dot_product_attention(
      q, k, v, q_offsets=jnp.array([1, 2]), implementation='xla'
    )


def test_packed_documents_and_block_diagonal_masks_skip_other_documents():
  # Four documents of 16 in T = S = 64, blocks of 8: query block i sees the
  # two key blocks of its document, both full (no element test); with
  # is_causal only the ones up to its own.
  ids = jnp.repeat(jnp.arange(4), 16)
  block_diagonal = ids[:, None] == ids[None, :]
  for vis in (
    Visibility(q_seg=ids, kv_seg=ids),
    Visibility(mask=block_diagonal),
    Visibility(is_causal=True, q_seg=ids, kv_seg=ids),
  ):
    for i in range(8):
      lo, full_lo, full_hi, hi = (int(x) for x in vis.kv_blocks(i, 8, 8, 8))
      document = 2 * (i // 2)
      if vis.is_causal:
        assert (lo, hi) == (document, i + 1) and (full_lo, full_hi) == (document, i)
      else:
        assert (lo, full_lo, full_hi, hi) == (
          document,
          document,
          document + 2,
          document + 2,
        )
      lo, full_lo, full_hi, hi = (int(x) for x in vis.q_blocks(i, 8, 8, 8))
      if not vis.is_causal:
        assert (lo, full_lo, full_hi, hi) == (
          document,
          document,
          document + 2,
          document + 2,
        )
