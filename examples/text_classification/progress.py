"""Training progress: the steps since the last record (their metrics, tokens
and time, read from the device only at the record so that steps queue up),
and the tqdm bar."""

from __future__ import annotations

import math
import time

import jax
import numpy as np


class NonFiniteLoss(Exception):
  """The loss of a step (the argument) is NaN or infinite."""


class Window:
  """The steps since the last train record: their metrics (read from the
  device only at the record, so steps queue up), their tokens and time, and
  the run's running totals (``tokens`` and wall ``seconds`` before this
  part, which started at ``part_started``)."""

  def __init__(self, tokens: int, seconds: float, part_started: float):
    self.total_tokens, self.seconds_before = tokens, seconds
    self.part_started = part_started
    self.pending, self.tokens, self.timed_tokens = [], 0, 0
    self.timed_since = time.perf_counter()

  def add(self, sums, batch) -> None:
    self.pending.append(sums)
    tokens = int(np.count_nonzero(batch['segments']))
    self.tokens += tokens
    self.timed_tokens += tokens

  def restart_clock(self) -> None:
    """Times from now on, leaving out what came before (compilation,
    evaluation, checkpoints)."""
    jax.block_until_ready(self.pending)
    self.timed_tokens, self.timed_since = 0, time.perf_counter()

  def record(self, step: int) -> dict:
    """The train record of the window ending at ``step``; starts the next.
    Raises NonFiniteLoss."""
    sums = jax.device_get(self.pending)
    first = step - len(sums) + 1
    for offset, window_sums in enumerate(sums):
      if not math.isfinite(float(window_sums['loss_sum'])):
        raise NonFiniteLoss(first + offset)
    seconds = time.perf_counter() - self.timed_since
    total = lambda key: sum(float(s[key]) for s in sums)
    count = max(total('count'), 1.0)
    self.total_tokens += self.tokens
    record = {
      'step': step,
      'split': 'train',
      'loss': total('loss_sum') / count,
      'accuracy': total('correct') / count,
      'grad_norm': total('grad_norm') / len(sums),
      'tokens_per_second': self.timed_tokens / seconds if self.timed_tokens else None,
      'tokens': self.total_tokens,
      'seconds': self.seconds(),
    }
    self.pending, self.tokens = [], 0
    self.restart_clock()
    return record

  def seconds(self) -> float:
    """Wall seconds of the run, over all its parts."""
    return self.seconds_before + time.perf_counter() - self.part_started


class Progress:
  """A tqdm bar that starts after the first step compiled and moves at each
  train record, when the queued steps have run (so its rate and ETA are the
  steady ones); it shows validation accuracy once there is one."""

  def __init__(self, config, best: float | None):
    self.config, self.best = config, best
    self.bar, self.postfix = None, {}

  def step(self, step: int) -> None:
    """Moves the bar to ``step`` (creating it at the first)."""
    if self.bar is None:
      from tqdm.auto import tqdm

      self.bar = tqdm(
        total=self.config.num_steps,
        initial=step,
        disable=not self.config.progress,
        unit='step',
        dynamic_ncols=True,
      )
    else:
      self.bar.update(step - self.bar.n)

  def show(self, record: dict) -> None:
    if record['split'] == 'validation':
      self.best = max(self.best or 0.0, record['accuracy'])
    else:
      self.postfix = {
        'loss': f'{record["loss"]:.3f}',
        'acc': f'{record["accuracy"]:.3f}',
        'tok/s': f'{record["tokens_per_second"] or 0:.0f}',
      }
    if self.best is not None:
      self.postfix['best_val'] = f'{self.best:.3f}'
    if self.bar is not None:
      self.bar.set_postfix(self.postfix)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
