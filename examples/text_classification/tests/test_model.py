"""The classifier: jattn and Flax attention agree on the same weights; masks,
pooling, positions and bfloat16 behave."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import config as config_lib
import model as model_lib
import train

SMALL = dict(num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_length=64)


def batch(seed=0, size=4, width=24):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, width + 1, size).astype(np.int32)
  tokens = rng.integers(3, 20, (size, width)) * (
    np.arange(width)[None] < lengths[:, None]
  )
  return jnp.asarray(tokens.astype(np.int32)), jnp.asarray(lengths)


def logits(config, params, tokens, lengths, **kwargs):
  task, _ = train.create(config, 20, 5)
  return task.model(params)(tokens, lengths, **kwargs)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
@pytest.mark.parametrize('attention', ['flax', 'reference', 'xla'])
def test_jattn_and_other_attention_agree_on_the_same_weights(pooling, attention):
  config = config_lib.Config(**SMALL, pooling=pooling)
  _, state = train.create(config, 20, 5)
  tokens, lengths = batch()
  expected = logits(config, state['params'], tokens, lengths)
  other = config_lib.Config(**SMALL, pooling=pooling, attention=attention)
  np.testing.assert_allclose(
    logits(other, state['params'], tokens, lengths), expected, rtol=1e-5, atol=1e-5
  )


def test_padding_does_not_change_the_logits():
  config = config_lib.Config(**SMALL, pooling='mean')
  _, state = train.create(config, 20, 5)
  tokens, lengths = batch(width=16)
  wider = jnp.pad(tokens, ((0, 0), (0, 16)), constant_values=7)  # junk past lengths
  np.testing.assert_allclose(
    logits(config, state['params'], wider, lengths),
    logits(config, state['params'], tokens, lengths),
    rtol=1e-5,
    atol=1e-5,
  )


def test_sinusoidal_positions():
  table = model_lib.sinusoidal_positions(50, 8)
  assert table.shape == (50, 8)
  np.testing.assert_allclose(table[:, 0], np.sin(np.arange(50)))
  np.testing.assert_allclose(table[:, 1], np.cos(np.arange(50)))
  config = config_lib.Config(**SMALL, positions='sinusoidal')
  _, state = train.create(config, 20, 5)
  assert 'positions' not in state['params']  # a constant, not trained


def test_dropout_is_keyed_and_bfloat16_runs():
  config = config_lib.Config(
    **SMALL, dtype='bfloat16', dropout_rate=0.5, attention_dropout_rate=0.3
  )
  task, state = train.create(config, 20, 5)
  model = task.model(state['params'])
  tokens, lengths = batch()
  run = lambda seed: model(
    tokens, lengths, deterministic=False, rngs=nnx.Rngs(dropout=seed)
  )
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  assert np.isfinite(model(tokens, lengths)).all()
  kernel = state['params']['blocks'][0]['mlp_in']['kernel']
  assert kernel.dtype == jnp.float32  # parameters stay float32


def test_attention_maps_are_distributions_over_real_tokens():
  config = config_lib.Config(**SMALL)
  task, state = train.create(config, 20, 5)
  tokens, lengths = batch()
  weights = task.model(state['params']).attention_maps(tokens, lengths, layer=1)
  assert weights.shape == (4, 4, 24, 24)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  beyond = jnp.arange(24)[None, None, None, :] >= lengths[:, None, None, None]
  assert float(jnp.where(beyond, weights, 0.0).max()) == 0.0
