"""The numerics every kernel shares, against a float64 oracle: the running
statistics started at the sink, folded block by block, merged and finished."""

import jax.numpy as jnp
import numpy as np
import pytest

from jattn import _numerics


def oracle(logits, values, sink):
  """float64 ``(out, lse)`` of a softmax whose denominator holds the sink
  (a key with a zero value)."""
  logits = np.asarray(logits, np.float64)
  columns = (
    logits
    if sink is None
    else np.concatenate([logits, np.full(logits.shape[:-1] + (1,), sink)], axis=-1)
  )
  with np.errstate(invalid='ignore'):  # a row of -inf alone: NaN, left out
    shift = columns.max(axis=-1, keepdims=True)
    total = np.exp(columns - shift).sum(axis=-1, keepdims=True)
    weights = np.exp(logits - shift) / total
  return weights @ np.asarray(values, np.float64), (shift + np.log(total))[:, 0]


@pytest.mark.parametrize('sink', [None, 0.5, -3.0])
@pytest.mark.parametrize('scale', [1.0, 1e4])  # extreme logits too
def test_start_fold_merge_and_finish_match_float64(sink, scale):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((6, 24)) * scale).astype(np.float32)
  logits[1, :] = -np.inf  # a row with nothing visible
  logits[2, 5:] = -np.inf
  values = rng.standard_normal((24, 3)).astype(np.float32)
  sink_logit = None if sink is None else jnp.float32(sink)
  # Folded block by block (flash), from the start value.
  acc, m, total = _numerics.start(6, 3, sink_logit)
  for j in range(0, 24, 8):
    m, total, p, correction = _numerics.online_update(m, total, logits[:, j : j + 8])
    acc = acc * correction[:, None] + p @ values[j : j + 8]
  folded = _numerics.normalize(acc, total), _numerics.log_sum_exp(m, total)

  # Merged partial results over disjoint keys (split-KV, ring, pages).
  def part(j):
    m, total, p, _ = _numerics.online_update(
      *_numerics.initial_stats(6), logits[:, j : j + 12]
    )
    return _numerics.normalize(p @ values[j : j + 12], total), m, total

  out, m, total = _numerics.merge(
    _numerics.merge(_numerics.start(6, 3, sink_logit), part(0)), part(12)
  )
  merged = out, _numerics.log_sum_exp(m, total)
  expected_out, expected_lse = oracle(logits, values, sink)
  for result in (folded, merged):
    out, lse = (np.asarray(x, np.float64) for x in result)
    seen = ~np.isnan(expected_out).any(axis=-1)
    np.testing.assert_allclose(out[seen], expected_out[seen], rtol=1e-5, atol=1e-6)
    if sink is None:  # nothing visible: zeros and -inf, never NaN
      np.testing.assert_array_equal(out[1], 0.0)
      assert lse[1] == -np.inf
    np.testing.assert_allclose(lse[seen], expected_lse[seen], rtol=1e-6)
