"""Plots: attention maps stay legible from short examples to 512 tokens."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

import plots


def test_token_ticks_label_every_token_up_to_128_then_every_kth():
  tokens = [f't{i}' for i in range(512)]
  ticks, labels = plots.token_ticks(tokens[:128], side=14.0)
  assert ticks == list(range(128)) and labels[5] == 't5'
  ticks, labels = plots.token_ticks(tokens, side=14.0)
  assert ticks[:3] == [0, 4, 8] and labels[1] == 't4 4'  # with its index


@pytest.mark.parametrize('heads, length', [(3, 24), (4, 512)])
def test_attention_figure_shows_every_head_on_one_labelled_scale(heads, length):
  weights = np.random.default_rng(0).dirichlet(np.ones(length), (heads, length))
  tokens = ['[CLS]'] + [f'w{i}' for i in range(1, length)]
  figure = plots.attention_figure(weights, tokens, 'a title')
  try:
    *maps, bar = figure.axes
    assert len(maps) == 2 * -(-heads // 2)  # two per row; a spare one is blank
    shown = [axis for axis in maps if axis.images]
    assert [axis.get_title() for axis in shown] == [f'head {h}' for h in range(heads)]
    ticks, labels = plots.token_ticks(tokens, side=min(max(4.5, 0.11 * length), 14))
    for head, axis in enumerate(shown):
      np.testing.assert_array_equal(axis.images[0].get_array(), weights[head])
      assert (axis.get_xlabel(), axis.get_ylabel()) == ('key', 'query')
      assert list(axis.get_xticks()) == ticks
      assert [t.get_text() for t in axis.get_xticklabels()] == labels
      assert [t.get_text() for t in axis.get_yticklabels()] == labels
      assert axis.images[0].norm is shown[0].images[0].norm  # one colour scale
    assert bar.get_ylabel() == 'attention weight (square-root scale)'
    assert figure.get_suptitle() == 'a title'
  finally:
    plt.close(figure)


def test_attention_plot_writes_a_png(tmp_path):
  path = tmp_path / 'attention.png'
  weights = np.full((2, 3, 3), 1 / 3)
  plots.plot_attention(weights, ['a', 'b', 'c'], 'a title', str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
