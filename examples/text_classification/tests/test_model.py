"""The classifier: packed examples equal examples alone; jattn and Flax
attention agree on the same weights; padding, pooling, positions, dropout,
bfloat16 and the attention maps behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import batches
import config as config_lib
import model as model_lib
import steps

SMALL = dict(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_length=64)
LENGTHS = [9, 24, 5, 17, 12, 3]


def data(lengths=LENGTHS, seed=0):
  rng = np.random.default_rng(seed)
  tokens = [
    np.concatenate([[2], rng.integers(3, 20, n - 1)]).astype(np.int32) for n in lengths
  ]
  return batches.Encoded(tokens, rng.integers(0, 5, len(lengths)).astype(np.int32))


def one_per_row(encoded, width=32):
  """Every example in a row of its own, padded to ``width``."""
  return jax.tree.map(jnp.asarray, batches.one_per_row(encoded, width))


def packed(encoded, width=32, slots=4):
  layout = batches.Layout(packed=True, width=width, slots=slots, bucket_width=8)
  rows = batches.pack(encoded.lengths, np.arange(len(encoded)), width, slots)
  return rows, jax.tree.map(
    jnp.asarray, batches.make_batch(encoded, rows, len(rows), layout)
  )


def logits(config, params, batch, **kwargs):
  task, _ = steps.create(config, 20, 5)
  return task.model(params)(batch, **kwargs)


@pytest.mark.parametrize(
  'pooling, positions', [('cls', 'learned'), ('mean', 'sinusoidal')]
)
def test_packed_examples_get_the_logits_they_get_alone(pooling, positions):
  config = config_lib.Config(**SMALL, pooling=pooling, positions=positions)
  _, state = steps.create(config, 20, 5)
  encoded = data()
  alone = logits(config, state['params'], one_per_row(encoded))[:, 0]  # [N, C]
  rows, batch = packed(encoded)
  assert max(len(row) for row in rows) > 1  # some rows do hold several
  together = logits(config, state['params'], batch)  # [R, slots, C]
  for r, row in enumerate(rows):
    np.testing.assert_allclose(
      together[r, : len(row)], alone[np.asarray(row)], rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
@pytest.mark.parametrize(
  'attention, pack', [('flax', True), ('reference', True), ('xla', False)]
)
def test_jattn_and_other_attention_agree_on_the_same_weights(pooling, attention, pack):
  config = config_lib.Config(**SMALL, pooling=pooling)
  _, state = steps.create(config, 20, 5)
  batch = packed(data())[1] if pack else one_per_row(data())
  other = config_lib.Config(**SMALL, pooling=pooling, attention=attention)
  np.testing.assert_allclose(
    logits(other, state['params'], batch),
    logits(config, state['params'], batch),
    rtol=1e-5,
    atol=1e-5,
  )


def test_padding_does_not_change_the_logits():
  config = config_lib.Config(**SMALL, pooling='mean')
  _, state = steps.create(config, 20, 5)
  narrow, wide = one_per_row(data(), 24), one_per_row(data(), 48)
  wide['tokens'] = jnp.where(wide['segments'] > 0, wide['tokens'], 7)  # junk
  np.testing.assert_allclose(
    logits(config, state['params'], wide),
    logits(config, state['params'], narrow),
    rtol=1e-5,
    atol=1e-5,
  )


def test_sinusoidal_positions():
  table = model_lib.sinusoidal_positions(50, 8)
  assert table.shape == (50, 8)
  np.testing.assert_allclose(table[:, 0], np.sin(np.arange(50)))
  np.testing.assert_allclose(table[:, 1], np.cos(np.arange(50)))
  config = config_lib.Config(**SMALL, positions='sinusoidal')
  _, state = steps.create(config, 20, 5)
  assert 'positions' not in state['params']  # a constant, not trained


def test_dropout_is_keyed_and_bfloat16_runs():
  config = config_lib.Config(
    **SMALL, dtype='bfloat16', dropout_rate=0.5, attention_dropout_rate=0.3
  )
  task, state = steps.create(config, 20, 5)
  model = task.model(state['params'])
  batch = packed(data())[1]
  run = lambda seed: model(batch, deterministic=False, rngs=nnx.Rngs(dropout=seed))
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  assert np.isfinite(model(batch)).all()
  kernel = state['params']['blocks'][0]['mlp_in']['kernel']
  assert kernel.dtype == jnp.float32  # parameters stay float32


@pytest.mark.parametrize(
  'attention, use_packing', [('default', True), ('default', False), ('flax', True)]
)
def test_attention_maps_are_distributions_inside_each_example(attention, use_packing):
  config = config_lib.Config(**SMALL, attention=attention)
  task, state = steps.create(config, 20, 5)
  batch = packed(data())[1] if use_packing else one_per_row(data())
  weights = task.model(state['params']).attention_maps(batch, layer=1)
  rows, width = batch['tokens'].shape
  assert weights.shape == (rows, 4, width, width)
  segments = batch['segments']
  real = segments > 0
  np.testing.assert_allclose(weights.sum(-1)[real[:, None].repeat(4, 1)], 1.0, 1e-5)
  other = segments[:, None, :, None] != segments[:, None, None, :]  # [R, 1, W, W]
  assert float(jnp.where(other & real[:, None, :, None], weights, 0.0).max()) == 0.0
