"""Fixtures shared by the tests (the strict JAX set-up is the root conftest's)."""

import pytest

from jattn import cache as kv


@pytest.fixture(params=['one page per step', 'default keys per step'])
def keys_per_step(request, monkeypatch):
  """Paged reads both ways: one page of 4 per step (the merge of steps is
  what the test sees) and the default (every page of the tests' small
  caches in one step). It is read when a step is traced: a test jits its
  step anew (or passes the setting as a static argument)."""
  if request.param == 'one page per step':
    monkeypatch.setattr(kv, 'KEYS_PER_STEP', 4)
  return request.param
