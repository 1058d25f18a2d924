"""The visibility value: its block ranges against its own elements, and the
new rules (chunked and prefix-LM attention) in every kernel."""

import functools
import inspect

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import _call, _prepare, _registry, _visibility, sharding, testing
from jattn._types import FULL, HIDDEN, PARTIAL
from jattn._visibility import Visibility
from jattn.attention import attention_and_lse
from tests import helpers


def dense(vis, t, s):
  visible = vis.elements(0, 0, t, s)
  return np.ones((t, s), bool) if visible is None else np.broadcast_to(visible, (t, s))


def numpy_visible(t, s, rules):
  """The rules of ``Visibility``'s docstring, element by element in NumPy."""
  r = rules['starts'][0] + np.arange(t)[:, None]
  c = rules['starts'][1] + np.arange(s)[None, :]
  p, p_k = r + rules['offsets'][0], c + rules['offsets'][1]
  visible = (c < rules['kv_size']) & (np.arange(s)[None, :] < rules['kv_extent'])
  visible = np.broadcast_to(visible, (t, s)).copy()
  if rules['causal']:
    prefix = -1 if rules['prefix'] is None else rules['prefix']
    visible &= (p_k <= p) | (p_k < prefix)
  if rules['window'] is not None:
    visible &= (p_k >= p - rules['window'][0]) & (p_k <= p + rules['window'][1])
  if rules['chunk'] is not None:
    visible &= p // rules['chunk'] == p_k // rules['chunk']
  if rules['q_len'] is not None:
    visible &= r < rules['q_len']
  if rules['kv_len'] is not None:
    visible &= c < rules['kv_len']
  if rules['q_seg'] is not None:
    visible &= rules['q_seg'][:, None] == rules['kv_seg'][None, :]
  if rules['mask'] is not None:
    visible &= rules['mask']
  return visible


def visibility_of(rules):
  as_array = lambda x: None if x is None else jnp.asarray(x)
  return Visibility(
    is_causal=rules['causal'],
    window=rules['window'],
    chunk_size=rules['chunk'],
    kv_size=rules['kv_size'],
    kv_extent=rules['kv_extent'],
    query_seq_lengths=as_array(rules['q_len']),
    key_value_seq_lengths=as_array(rules['kv_len']),
    prefix_lengths=as_array(rules['prefix']),
    q_start=as_array(rules['starts'][0]),
    kv_start=as_array(rules['starts'][1]),
    q_offsets=as_array(rules['offsets'][0]),
    kv_offsets=as_array(rules['offsets'][1]),
    q_segment_ids=as_array(rules['q_seg']),
    kv_segment_ids=as_array(rules['kv_seg']),
    mask=as_array(rules['mask']),
  )


def brute_states(visible, t, s, bq, bk):
  """``[nq, nk]`` states of the real rows and columns of each block (full:
  every real row sees every column, and no column is padding)."""
  nq, nk = -(-t // bq), -(-s // bk)
  states = np.full((nq, nk), HIDDEN)
  for i in range(nq):
    for j in range(nk):
      block = visible[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
      if block.all() and block.shape[1] == bk:
        states[i, j] = FULL
      elif block.any():
        states[i, j] = PARTIAL
  return states


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def row_plan(vis, t, s, bq, bk):
  """One row's ``(elements [t, s], states [nq, nk], plan)``, compiled once
  for the rows of an example (they share shapes and static rules)."""
  nq, nk = -(-t // bq), -(-s // bk)
  padded = vis.pad(nq * bq, nk * bk, vis.kv_extent if vis.kv_extent else s)
  elements = vis.elements(0, 0, t, s)
  elements = jnp.ones((t, s), bool) if elements is None else elements
  states = padded.block_states(bq, bk, nq, nk)
  return jnp.broadcast_to(elements, (t, s)), states, padded.block_plan(bq, bk, nq, nk)


def check_plan(states, plan):
  """The visit lists list the partial blocks, then the full ones, both ways."""
  for visits, by_block in ((plan.kv, states), (plan.q, states.T)):
    for n, row in enumerate(by_block):
      order, partial, full = (np.asarray(x[n]) for x in visits)
      assert partial == (row == PARTIAL).sum() and full == (row == FULL).sum()
      assert (row[order[:partial]] == PARTIAL).all()
      assert (row[order[partial : partial + full]] == FULL).all()


ROWS = 3
per_row = lambda strategy: st.one_of(
  st.none(), st.lists(strategy, min_size=ROWS, max_size=ROWS)
)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
  t=st.integers(1, 40),
  s=st.integers(1, 40),
  bq=st.sampled_from([4, 8]),
  bk=st.sampled_from([4, 8, 16]),
  causal=st.booleans(),
  window=st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
  chunk=st.one_of(st.none(), st.integers(1, 12)),
  prefix=per_row(st.integers(0, 20)),
  q_len=per_row(st.integers(0, 40)),
  kv_len=per_row(st.integers(0, 40)),
  starts=st.tuples(st.integers(0, 16), st.integers(0, 16)),
  offsets=st.lists(
    st.tuples(st.integers(0, 24), st.integers(0, 24)), min_size=ROWS, max_size=ROWS
  ),
  segments=st.sampled_from([None, 'sorted', 'unsorted']),
  mask=st.sampled_from([None, 'random', 'block diagonal', 'rows', 'columns']),
  seed=st.integers(0, 2**16),
)
def test_block_mask_is_sound_against_numpy(
  t, s, bq, bk, causal, window, chunk, prefix, q_len, kv_len, starts, offsets,
  segments, mask, seed,
):  # fmt: skip
  """For several rows of a batch, each with its own lengths, prefix,
  offsets, segment ids and mask: elements equal a NumPy oracle; a hidden
  block holds no visible element and a full one is visible throughout
  (padding included: a full block has no padded key), for every rule, a
  ring step's starts, the caller's offsets, segment ids (sorted as packed
  documents, or not) and dense masks; the visit lists say the same both
  ways. (The exact case has its own test below.)"""
  rng = np.random.default_rng(seed)
  for row in range(ROWS):
    q_seg = kv_seg = None
    if segments is not None:
      q_seg, kv_seg = rng.integers(0, 3, t), rng.integers(0, 3, s)
      if segments == 'sorted':
        q_seg, kv_seg = np.sort(q_seg), np.sort(kv_seg)
    of_row = lambda values, row=row: None if values is None else values[row]
    rules = dict(
      causal=causal,
      window=window,
      chunk=chunk,
      prefix=of_row(prefix) if causal else None,
      q_len=of_row(q_len),
      kv_len=of_row(kv_len),
      starts=starts,
      offsets=offsets[row],
      kv_size=starts[1] + s - 3,  # the last keys are a ring's padding
      kv_extent=s - 1,  # and the very last a kernel's
      q_seg=q_seg,
      kv_seg=kv_seg,
      mask={
        None: None,
        'random': rng.random((t, s)) < 0.5,
        'block diagonal': (np.arange(t)[:, None] // 8) == (np.arange(s)[None, :] // 8),
        'rows': rng.random((t, 1)) < 0.7,
        'columns': rng.random((1, s)) < 0.7,
      }[mask],
    )
    elements, states, plan = row_plan(visibility_of(rules), t, s, bq, bk)
    visible = numpy_visible(t, s, rules)
    np.testing.assert_array_equal(elements, visible)
    states = np.asarray(states)
    check_plan(states, plan)
    brute = brute_states(visible, t, s, bq, bk)
    assert ((states == HIDDEN) <= (brute == HIDDEN)).all()
    assert ((states == FULL) <= (brute == FULL)).all()


@pytest.mark.parametrize(
  'rule',
  [
    dict(causal=True),
    dict(causal=True, prefix=12),
    dict(window=(5, 3)),
    dict(chunk=12),
    dict(q_len=13, kv_len=21),
    dict(segments=True),
    dict(mask=True),
    dict(segments=True, causal=True, offsets=(8, 0)),
  ],
  ids=str,
)
def test_block_mask_is_exact_for_whole_blocks(rule):
  """With whole blocks the states equal the brute-force classification of
  the NumPy mask: interval rules alone, sorted segment ids alone, a dense
  mask alone, and packed documents under causal with an offset; for three
  rows, each with its own ids, mask and offsets."""
  for row in range(3):
    exact_for_row(rule, row)


def exact_for_row(rule, row):
  t = s = 32
  rng = np.random.default_rng(row)
  ids = np.sort(rng.integers(0, 4, t)) if rule.get('segments') else None
  shift = lambda pair: tuple(x + 4 * row * (x > 0) for x in pair)
  vary = lambda value, by: None if value is None else value + by
  rules = dict(
    causal=rule.get('causal', False),
    window=rule.get('window'),
    chunk=rule.get('chunk'),
    prefix=vary(rule.get('prefix'), 5 * row),
    q_len=vary(rule.get('q_len'), -4 * row),
    kv_len=vary(rule.get('kv_len'), 3 * row),
    starts=(0, 0),
    offsets=shift(rule.get('offsets', (0, 0))),
    kv_size=s,
    kv_extent=s,
    q_seg=ids,
    kv_seg=ids,
    mask=rng.random((t, s)) < 0.02 if rule.get('mask') else None,
  )
  visible = numpy_visible(t, s, rules)
  _, states, plan = row_plan(visibility_of(rules), t, s, 4, 8)
  check_plan(np.asarray(states), plan)
  np.testing.assert_array_equal(states, brute_states(visible, t, s, 4, 8))


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


def test_the_public_signatures_take_every_per_sequence_array():
  for fn in (jattn.dot_product_attention, sharding.ring_attention):
    assert set(_visibility.sequence_arrays()) <= set(inspect.signature(fn).parameters)


def test_a_rule_added_to_the_table_alone_is_applied_and_refused_by_xla(monkeypatch):
  # A new per-sequence rule, declared in ARRAYS and nowhere else: keys before
  # column `first_keys` are hidden (left padding). The public functions take
  # it by keyword, reference, flash and the ring apply it (and skip blocks by
  # it), and xla, which was not taught it, refuses (an allow-list).
  first_keys = _visibility.Array(
    'sequence',
    '[B...]',
    interval=lambda vis, first, last: (
      (vis.first_keys, 2**29),
      (vis.first_keys, 2**29),
    ),
  )
  monkeypatch.setitem(_visibility.ARRAYS, 'first_keys', first_keys)
  q, k, v = helpers.qkv(3, q_len=32, kv_len=32)
  starts = jnp.array([5, 19])
  visible = jnp.arange(32)[None, :] >= starts[:, None]  # [B, S]
  expected = jax.nn.dot_product_attention(
    q, k, v, mask=visible[:, None, None, :] & jnp.tril(jnp.ones((1, 1, 32, 32), bool))
  )
  options = dict(is_causal=True, first_keys=starts, block_sizes=(8, 8))
  hidden_rows = jnp.arange(32)[None, :, None, None] < starts[:, None, None, None]
  expected = jnp.where(hidden_rows, 0.0, expected)  # rows that see no key
  for impl in ('reference', 'flash'):
    out, _ = attention_and_lse(q, k, v, implementation=impl, **options)
    testing.assert_trees_close(out, expected, jnp.float32)
  call, opts, statics = _call.split_call(
    dict(query=q, key=k, value=v, **options), strict=True
  )
  ring = sharding._ring_jit(
    call,
    opts,
    statics,
    sharding.make_mesh({'seq': 4}, devices=jax.devices()[:4]),
    'seq',
  )
  testing.assert_trees_close(ring, expected, jnp.float32)
  p = _prepare.prepare_call(call, opts, statics)
  assert 'first_keys' in _registry.KERNELS['xla'].supports(p)
  with pytest.raises(ValueError, match=r"'xla' cannot take.*first_keys"):
    attention_and_lse(q, k, v, implementation='xla', **options)


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
  # is_causal only the ones up to its own, the diagonal one partial.
  ids = jnp.repeat(jnp.arange(4), 16)
  block_diagonal = ids[:, None] == ids[None, :]
  document = np.repeat(np.arange(4), 2)
  same = document[:, None] == document[None, :]
  below = np.tri(8, dtype=bool)
  diagonal = np.eye(8, dtype=bool)
  expected = {
    False: np.where(same, FULL, HIDDEN),
    True: np.where(same & below, np.where(diagonal, PARTIAL, FULL), HIDDEN),
  }
  for vis in (
    Visibility(q_segment_ids=ids, kv_segment_ids=ids),
    Visibility(mask=block_diagonal),
    Visibility(is_causal=True, q_segment_ids=ids, kv_segment_ids=ids),
  ):
    states = vis.block_states(8, 8, 8, 8)
    np.testing.assert_array_equal(states, expected[vis.is_causal])
