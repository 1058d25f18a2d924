"""PNG plots of a run: loss and accuracy curves, and one layer's attention."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib.colors import PowerNorm

import batches as batches_lib


def plot_curves(records: list[dict], path: str) -> None:
  """Loss and accuracy against step, train and validation."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  for split, style in (('train', '-'), ('validation', 'o-')):
    rows = [r for r in records if r['split'] == split]
    steps = [r['step'] for r in rows]
    for axis, key in zip(axes, ('loss', 'accuracy'), strict=True):
      axis.plot(steps, [r[key] for r in rows], style, label=split, markersize=3)
  for axis, key in zip(axes, ('loss', 'accuracy'), strict=True):
    axis.set_xlabel('step')
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)
    axis.legend()
  figure.savefig(path, dpi=110)
  plt.close(figure)


FONT_SIZE = 6.5  # of the token labels, in points


def token_ticks(tokens: list[str], side: float) -> tuple[list[int], list[str]]:
  """Tick positions and labels for a ``side``-inch axis: every token where
  they fit, else every k-th, labelled with its index too."""
  every = math.ceil(len(tokens) * (FONT_SIZE + 1) / (side * 72))  # in points
  ticks = list(range(0, len(tokens), every))
  return ticks, [tokens[i] if every == 1 else f'{tokens[i]} {i}' for i in ticks]


def plot_attention(weights: np.ndarray, tokens: list[str], title: str, path: str):
  """``attention_figure`` saved as a PNG at ``path``."""
  figure = attention_figure(weights, tokens, title)
  figure.savefig(path, dpi=100)
  plt.close(figure)


def attention_figure(weights: np.ndarray, tokens: list[str], title: str):
  """Every head's ``[T, T]`` map, two per row, on one colour scale (square
  root, so that weak links show too); queries down, keys across, tokens on
  both axes (every k-th where they would overlap)."""
  heads, length = weights.shape[0], len(tokens)
  columns = min(heads, 2)
  rows = math.ceil(heads / columns)
  side = min(max(4.5, 0.11 * length), 14.0)  # inches per head
  figure, axes = plt.subplots(
    rows,
    columns,
    figsize=(side * columns + 1.5, side * rows + 0.8),
    squeeze=False,
    layout='constrained',
  )
  ticks, labels = token_ticks(tokens, side)
  scale = PowerNorm(0.5, vmin=0.0, vmax=max(float(weights.max()), 1e-6))
  image = None
  for head, axis in enumerate(axes.flat):
    if head >= heads:
      axis.axis('off')
      continue
    image = axis.imshow(weights[head], cmap='viridis', norm=scale)
    axis.set_title(f'head {head}', fontsize=12)
    axis.set_xticks(ticks, labels, rotation=90, fontsize=FONT_SIZE)
    axis.set_yticks(ticks, labels, fontsize=FONT_SIZE)
    axis.set_xlabel('key', fontsize=12)
    axis.set_ylabel('query', fontsize=12)
  bar = figure.colorbar(image, ax=axes, shrink=0.6, aspect=30)
  bar.set_label('attention weight (square-root scale)', fontsize=11)
  figure.suptitle(title, fontsize=13)
  return figure


def write_all(workdir, records, task, params, data) -> None:
  """``curves.png`` and ``attention.png`` (the last layer's heads on the test
  example nearest 64 tokens)."""
  plot_curves(records, os.path.join(workdir, 'curves.png'))
  test = data.splits['test']
  index = int(np.argmin(np.abs(test.lengths - 64)))
  ids = test.tokens[index]
  batch = {k: jnp.asarray(v) for k, v in batches_lib.one_example(ids).items()}
  layer = len(task.model(params).blocks) - 1

  @jax.jit  # one program, not one per operation
  def maps_and_logits(params, batch):
    model = task.model(params)
    return model.attention_maps(batch, layer)[0], model(batch)[0, 0]

  weights, logits = maps_and_logits(params, batch)
  weights = np.asarray(weights)
  predicted = data.names[int(jnp.argmax(logits))]
  title = (
    f'layer {layer}, test example {index} ({len(ids)} tokens): label '
    f'{data.names[int(test.labels[index])]}, predicted {predicted}'
  )
  plot_attention(
    weights, data.tokenizer.decode(ids), title, os.path.join(workdir, 'attention.png')
  )
