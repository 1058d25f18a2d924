"""The mask helpers, and that each equals the matching keyword argument."""

import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import testing
from tests import helpers


def test_helpers_by_hand():
  np.testing.assert_array_equal(jattn.causal_mask(2, 3), [[1, 0, 0], [1, 1, 0]])
  np.testing.assert_array_equal(
    jattn.local_window_mask(3, 3, (1, 0)), [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
  )
  pad = jattn.padding_mask(jnp.array([1]), jnp.array([2]), 2, 3)
  assert pad.shape == (1, 1, 2, 3)
  np.testing.assert_array_equal(pad[0, 0], [[1, 1, 0], [0, 0, 0]])
  seg = jattn.segment_mask(jnp.array([[0, 1]]), jnp.array([[1, 1, 0]]))
  np.testing.assert_array_equal(seg[0, 0], [[0, 0, 1], [1, 1, 0]])
  assert jattn.combine_masks(None, None) is None
  np.testing.assert_array_equal(
    jattn.combine_masks(jattn.causal_mask(2, 2), None, pad[..., :2]),
    [[[[1, 0], [0, 0]]]],
  )


@pytest.mark.parametrize(
  'kwargs, mask_fn',
  [
    ({'is_causal': True}, lambda: jattn.causal_mask(6, 7)),
    ({'local_window_size': (1, 2)}, lambda: jattn.local_window_mask(6, 7, (1, 2))),
    (
      {'key_value_seq_lengths': jnp.array([3, 7])},
      lambda: jattn.padding_mask(None, jnp.array([3, 7]), 6, 7),
    ),
  ],
)
def test_keyword_equals_mask(kwargs, mask_fn):
  q, k, v = helpers.qkv(0)
  testing.assert_trees_close(
    jattn.dot_product_attention(q, k, v, **kwargs),
    jattn.dot_product_attention(q, k, v, mask=mask_fn()),
    jnp.float32,
  )
