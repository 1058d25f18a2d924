"""PNG plots of a run: loss and accuracy curves, and one layer's attention."""

from __future__ import annotations

import os

import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt


def plot_curves(records: list[dict], path: str) -> None:
  """Loss and accuracy against step, train and validation."""
  figure, axes = plt.subplots(1, 2, figsize=(11, 4))
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
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def plot_attention(weights, tokens: list[str], title: str, path: str) -> None:
  """Every head's ``[T, T]`` map side by side; tokens on both axes."""
  heads = weights.shape[0]
  columns = min(heads, 4)
  rows = -(-heads // columns)
  size = max(3.0, 0.12 * len(tokens))
  figure, axes = plt.subplots(
    rows, columns, figsize=(size * columns, size * rows), squeeze=False
  )
  for head, axis in enumerate(axes.flat):
    if head >= heads:
      axis.axis('off')
      continue
    axis.imshow(weights[head], cmap='viridis', vmin=0.0)
    axis.set_title(f'head {head}')
    if len(tokens) <= 80:
      axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
      axis.set_yticks(range(len(tokens)), tokens, fontsize=6)
    axis.set_xlabel('key')
    axis.set_ylabel('query')
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write_all(workdir, records, task, params, test, tokenizer, names) -> None:
  """``curves.png`` and ``attention.png`` (the last layer, on a short test example)."""
  plot_curves(records, os.path.join(workdir, 'curves.png'))
  lengths = test.lengths
  index = int(min(range(len(test)), key=lambda i: abs(int(lengths[i]) - 32)))
  ids = test.tokens[index]
  model = task.model(params)
  layer = len(model.blocks) - 1
  weights = model.attention_maps(jnp.asarray(ids)[None], jnp.asarray([len(ids)]), layer)
  logits = model(jnp.asarray(ids)[None], jnp.asarray([len(ids)]))
  predicted = names[int(jnp.argmax(logits))]
  title = (
    f'layer {layer}, test example {index}: label {names[int(test.labels[index])]}, '
    f'predicted {predicted}'
  )
  plot_attention(
    weights[0], tokenizer.decode(ids), title, os.path.join(workdir, 'attention.png')
  )
