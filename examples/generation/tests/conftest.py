"""The example's modules import each other by name (as Flax's examples do)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import pytest


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
  """optax's AdamW mixes a float and an int32 step count, which the suite's
  strict promotion rejects; the example runs with JAX's default."""
  with jax.numpy_dtype_promotion('standard'):
    yield
