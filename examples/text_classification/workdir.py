"""A run's directory: its config, its metrics log and its summary.

``--workdir`` holds one run: ``config.json`` (the flags it was started with),
``vocab.json`` and ``labels.json``, ``metrics.jsonl`` (one JSON record per
line: 'train' windows, 'validation' and 'test' results), ``summary.json``,
plots and checkpoints (``checkpoints.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import config as config_lib
import vocabulary

CONFIG, METRICS, SUMMARY = 'config.json', 'metrics.jsonl', 'summary.json'
SUMMARY_KEYS = {
  'best_validation_accuracy',
  'best_step',
  'test_accuracy',
  'majority_class_test_accuracy',
  'steps',
  'train_tokens',
  'train_tokens_per_second',
  'wall_seconds',
  'devices',
}


def check_config(config) -> None:
  """Refuses to resume a run with flags that change what it computes (all but
  ``config.MAY_CHANGE_ON_RESUME``)."""
  path = os.path.join(config.workdir, CONFIG)
  if not os.path.exists(path):
    return
  try:
    with open(path) as file:
      saved = json.load(file)
  except (OSError, ValueError) as error:
    raise config_lib.UserError(
      f'{path} cannot be read ({error}); use a new --workdir.'
    ) from None
  current = dataclasses.asdict(config)
  differ = [
    f'--{k} {saved[k]!r} -> {current[k]!r}'
    for k in current
    if k not in config_lib.MAY_CHANGE_ON_RESUME
    and k in saved
    and saved[k] != current[k]
  ]
  if differ:
    raise config_lib.UserError(
      f'{config.workdir} holds a run with other settings ({"; ".join(differ)}). '
      'Use a new --workdir, or the same flags to resume.'
    )


def create(config, tokenizer, names, fresh: bool) -> None:
  """Creates the workdir (once the run is known to start) and writes the
  config, and the vocabulary and labels of a fresh run."""
  try:
    os.makedirs(config.workdir, exist_ok=True)
    if fresh:
      vocabulary.save(config.workdir, tokenizer, names)
    with open(os.path.join(config.workdir, CONFIG), 'w') as file:
      json.dump(dataclasses.asdict(config), file, indent=1)
  except OSError as error:
    raise config_lib.UserError(
      f'--workdir {config.workdir} cannot be written ({error.strerror or error}).'
    ) from None


def _read_records(path: str) -> list[dict]:
  """The records of a metrics file; a damaged line (a kill during a write) is
  dropped with a warning."""
  records = []
  with open(path, encoding='utf-8', errors='replace') as file:
    for line_number, line in enumerate(file, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        print(
          f'warning: {path}:{line_number} is a partial record; dropped.',
          file=sys.stderr,
        )
  return [r for r in records if isinstance(r, dict) and 'step' in r]


class MetricsLog:
  """``metrics.jsonl``, kept across resumes.

  Train records carry the run's running totals (``tokens`` trained,
  ``seconds`` of wall time over all its parts), so a resumed run goes on
  counting from the record of the step it resumes from.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, METRICS)
    records = _read_records(self.path) if os.path.exists(self.path) else []
    # Drop what a killed run logged after its last checkpoint (it is redone)
    # and any test result (written again at the end).
    self.records = [
      r
      for r in records
      if r['step'] <= resume_step and r.get('split') in ('train', 'validation')
    ]
    with open(self.path, 'w') as file:
      file.writelines(json.dumps(r) + '\n' for r in self.records)

  def write(self, record: dict) -> None:
    self.records.append(record)
    with open(self.path, 'a') as file:
      file.write(json.dumps(record) + '\n')

  def of(self, split: str) -> list[dict]:
    return [r for r in self.records if r['split'] == split]

  def best_accuracy(self) -> float | None:
    return max((r['accuracy'] for r in self.of('validation')), default=None)

  def totals(self) -> tuple[int, float]:
    """(tokens, wall seconds) of the run so far, by its last train record."""
    last = self.of('train')[-1:] or [{}]
    return last[0].get('tokens', 0), last[0].get('seconds', 0.0)


def read_summary(config) -> dict | None:
  """The summary of a finished run of ``config.num_steps`` steps, or None."""
  path = os.path.join(config.workdir, SUMMARY)
  try:
    with open(path) as file:
      summary = json.load(file)
  except (OSError, ValueError):
    return None
  finished = isinstance(summary, dict) and summary.get('steps') == config.num_steps
  return summary if finished and set(summary) >= SUMMARY_KEYS else None


def write_summary(workdir: str, summary: dict) -> None:
  with open(os.path.join(workdir, SUMMARY), 'w') as file:
    json.dump(summary, file, indent=1)
