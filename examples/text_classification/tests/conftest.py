"""The example's modules import each other by name (as Flax's examples do)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import pytest


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
  """optax's Adam raises a float to an int32 step count, which the suite's strict
  promotion rejects; the example (like any user script) runs with JAX's default.
  Rank promotion stays strict."""
  with jax.numpy_dtype_promotion('standard'):
    yield
