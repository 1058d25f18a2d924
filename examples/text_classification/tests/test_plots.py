"""Plots: attention maps stay legible from short examples to 512 tokens."""

import numpy as np
import pytest

import plots


def test_token_ticks_label_every_token_up_to_128_then_every_kth():
  tokens = [f't{i}' for i in range(512)]
  ticks, labels = plots.token_ticks(tokens[:128], side=14.0)
  assert ticks == list(range(128)) and labels[5] == 't5'
  ticks, labels = plots.token_ticks(tokens, side=14.0)
  assert ticks[:3] == [0, 4, 8] and labels[1] == 't4 4'  # with its index


@pytest.mark.parametrize('length', [24, 512])
def test_attention_plot_renders(tmp_path, length):
  weights = np.random.default_rng(0).dirichlet(np.ones(length), (4, length))
  path = tmp_path / 'attention.png'
  tokens = ['[CLS]'] + ['[MAX'] * (length - 1)
  plots.plot_attention(weights, tokens, 'a title', str(path))
  assert path.stat().st_size > 10_000
