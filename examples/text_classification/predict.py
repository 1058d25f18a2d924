"""Predictions from a trained run: its config, vocabulary, labels and checkpoint."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import batches
import config as config_lib
import steps
import vocabulary
from checkpoints import Checkpoints


def load(workdir: str):
  """(task, params, tokenizer, label names, config) of the run in ``workdir``:
  the best validation checkpoint, else the latest."""
  config_path = os.path.join(workdir, 'config.json')
  saved = vocabulary.load(workdir)
  if not os.path.exists(config_path) or saved is None:
    raise config_lib.UserError(
      f'{workdir} lacks config.json, {vocabulary.VOCABULARY_FILE} or '
      f'{vocabulary.LABELS_FILE}: is it the --workdir of a training run?'
    )
  with open(config_path) as file:
    config = config_lib.Config(**json.load(file))
  tokenizer, names = saved
  task, state = steps.create(config, tokenizer.size, len(names))
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  restored = checkpoints.restore_best(state) or checkpoints.restore(state)
  checkpoints.close()
  if restored is None:
    raise config_lib.UserError(f'no checkpoint in {workdir}: train first.')
  return task, restored['params'], tokenizer, names, config


def predict(workdir: str, texts: list[str]) -> list[dict[str, float]]:
  """Per text, each label's probability."""
  task, params, tokenizer, names, config = load(workdir)
  results = []
  for text in texts:
    batch = batches.one_example(tokenizer.encode(text, config.max_length))
    probabilities = steps.predict_step(task, params, jax.tree.map(jnp.asarray, batch))
    results.append(
      dict(zip(names, np.asarray(probabilities[0, 0]).tolist(), strict=True))
    )
  return results


def print_predictions(workdir: str, texts: list[str]) -> None:
  for text, probabilities in zip(texts, predict(workdir, texts), strict=True):
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    print(f'{text!r} -> {ranked[0][0]}')
    print('  ' + ', '.join(f'{name}: {p:.3f}' for name, p in ranked[:10]))
