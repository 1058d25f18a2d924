"""The training loop around ``steps``: data, evaluation, checkpoints, signals,
progress, metrics, the summary and the plots.

``train_and_evaluate`` reads top to bottom: prepare, restore, train, test.
A rerun of the same command resumes from the workdir's latest checkpoint;
a finished run is left as it is.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from typing import NamedTuple

import jax
import numpy as np

import batches as batches_lib
import config as config_lib
import sources
import steps as steps_lib
import vocabulary
import workdir
from checkpoints import Checkpoints


class Data(NamedTuple):
  tokenizer: vocabulary.Tokenizer
  names: list[str]  # label names; a label's id is its index
  splits: dict[str, batches_lib.Encoded]  # 'train', 'validation', 'test'
  layout: batches_lib.Layout
  fresh: bool  # True: tokenizer and names built now, not read from the workdir


def prepare_data(config) -> Data:
  """The splits as token ids; on resume the vocabulary and labels are read
  from the workdir, else built from the training split."""
  splits = sources.load_splits(config)
  saved = vocabulary.load(config.workdir)
  if saved is not None:
    tokenizer, names = saved
  else:
    tokenizer = vocabulary.Tokenizer.build(
      config.tokenizer,
      [e.text for e in splits['train']],
      min_count=config.min_count,
      max_size=config.vocab_size,
    )
    names = vocabulary.label_names(splits['train'])
  encoded = {
    name: batches_lib.encode(examples, tokenizer, names, config.max_length)
    for name, examples in splits.items()
  }
  layout = batches_lib.Layout.of(config, list(encoded.values()))
  return Data(tokenizer, names, encoded, layout, saved is None)


def evaluate(steps: steps_lib.Steps, state, split, layout, config) -> dict:
  """Loss and accuracy of ``state`` on every example of ``split``."""
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in batches_lib.eval_batches(split, layout, config.eval_batch_size):
    sums = steps.evaluate(state, jax.device_put(batch, steps.batch_sharding))
    totals = {k: totals[k] + float(v) for k, v in sums.items()}
  count = max(totals['count'], 1.0)
  return {'loss': totals['loss_sum'] / count, 'accuracy': totals['correct'] / count}


class StopRequest:
  """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of
  a logging window. A second signal stops at once."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:
      raise KeyboardInterrupt
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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


def validate(config, steps, state, data: Data, log, checkpoints) -> dict:
  """Logs the validation record of ``state``, checkpointed as the best if it is."""
  result = evaluate(steps, state, data.splits['validation'], data.layout, config)
  best = log.best_accuracy()
  if best is None or result['accuracy'] > best:
    checkpoints.save(state, best=True)
  record = {'step': int(state['step']), 'split': 'validation', **result}
  log.write(record)
  return record


def train(config, steps, state, data: Data, log, checkpoints: Checkpoints, window):
  """Steps from ``state`` to ``config.num_steps``: records every
  ``log_every`` steps and at each checkpoint, validates every ``eval_every``
  (saving the best), checkpoints every ``checkpoint_every`` and at the end.
  A stop request ends the run at the next record, checkpointed."""
  start = int(state['step'])
  batches = batches_lib.train_batches(data.splits['train'], data.layout, config, start)
  dropout_key = jax.random.key(config.seed + 1)
  progress = Progress(config, log.best_accuracy())
  if start < config.num_steps and config.progress:
    print('compiling the train step ...', flush=True)
  with StopRequest() as stop:
    for step in range(start + 1, config.num_steps + 1):
      batch = jax.device_put(next(batches), steps.batch_sharding)
      state, sums = steps.train(state, batch, jax.random.fold_in(dropout_key, step))
      window.add(sums, batch)
      if step == start + 1:
        window.restart_clock()  # leaves compilation out of tokens/s
        progress.step(step)
      at_end = step == config.num_steps
      checkpoint = step % config.checkpoint_every == 0 or at_end
      if step % config.log_every == 0 or checkpoint:
        try:
          record = window.record(step)
        except NonFiniteLoss as error:
          progress.close()
          raise SystemExit(
            f'the loss is not finite at step {error}: training stopped. The last '
            f'good checkpoint is in {config.workdir}/checkpoints (step '
            f'{checkpoints.latest.latest_step()}); lower --learning_rate or '
            '--clip_norm (or use --dtype float32) and rerun to resume from it.'
          ) from None
        log.write(record)
        progress.step(step)
        progress.show(record)
        stopping = stop.signal is not None
      else:
        stopping = False
      evaluating = step % config.eval_every == 0 or at_end
      if evaluating:
        progress.show(validate(config, steps, state, data, log, checkpoints))
      if checkpoint or stopping:
        checkpoints.save(state)
      if evaluating or checkpoint:
        window.restart_clock()  # leaves evaluation and checkpoints out
      if stopping:
        progress.close()
        checkpoints.close()
        print(
          f'\nstopped by signal {stop.signal} at step {step}; checkpoint saved. '
          'Run the same command again to resume.'
        )
        raise SystemExit(128 + stop.signal)
  progress.close()
  return state


def test(config, steps, state, data: Data, log, checkpoints, window) -> dict:
  """Tests the best validation checkpoint, writes the summary and the plots."""
  best = checkpoints.restore(state, best=True)
  if best is None:
    print(
      f'warning: no readable checkpoint in {config.workdir}/best; testing the '
      f'latest state (step {int(state["step"])}) instead.',
      file=sys.stderr,
    )
    best = state
  result = evaluate(steps, best, data.splits['test'], data.layout, config)
  log.write({'step': int(best['step']), 'split': 'test', **result})
  train_labels = np.bincount(data.splits['train'].labels, minlength=len(data.names))
  majority = int(np.argmax(train_labels))
  rates = [r['tokens_per_second'] for r in log.of('train') if r['tokens_per_second']]
  summary = {
    'best_validation_accuracy': log.best_accuracy(),
    'best_step': int(best['step']),
    'test_accuracy': result['accuracy'],
    'majority_class_test_accuracy': float(
      np.mean(data.splits['test'].labels == majority)
    ),
    'steps': config.num_steps,
    'train_tokens': log.totals()[0],
    'train_tokens_per_second': float(np.median(rates)) if rates else None,
    'wall_seconds': None,  # after the plots
    'devices': jax.device_count(),
  }
  try:
    import plots
  except ImportError:  # matplotlib is in the 'examples' extra
    print("no plots: pip install -e '.[examples]' for matplotlib")
  else:
    plots.write_all(config.workdir, log.records, steps.task, best['params'], data)
  summary['wall_seconds'] = window.seconds()
  workdir.write_summary(config.workdir, summary)
  return summary


def train_and_evaluate(config) -> dict:
  """Trains, tests the best checkpoint and plots; resumes from
  ``config.workdir`` if it holds a run, and returns a finished run's summary
  untouched. Returns the summary (also in ``workdir/summary.json``)."""
  config_lib.validate(config)
  workdir.check_config(config)
  finished = workdir.read_summary(config)
  if finished is not None:
    print(f'{config.workdir} holds a finished run of {config.num_steps} steps.')
    return finished
  started = time.perf_counter()
  mesh = steps_lib.make_mesh(config)
  data = prepare_data(config)
  workdir.create(config, data.tokenizer, data.names, data.fresh)

  task, state = steps_lib.create(config, data.tokenizer.size, len(data.names))
  steps = steps_lib.jit_steps(task, state, mesh)
  checkpoints = Checkpoints(config.workdir, config.keep_checkpoints)
  state = jax.device_put(state, steps.state_sharding)
  restored = checkpoints.restore(state)
  if restored is not None:
    state = restored
  start = int(state['step'])
  if start > config.num_steps:
    raise config_lib.UserError(
      f'{config.workdir} holds a run at step {start}, past --num_steps '
      f'{config.num_steps}; give --num_steps {start} or more.'
    )
  log = workdir.MetricsLog(config.workdir, start)
  window = Window(*log.totals(), part_started=started)
  sizes = ' / '.join(f'{len(s)} {name}' for name, s in data.splits.items())
  print(
    f'{sizes} examples, {len(data.names)} classes, vocabulary '
    f'{data.tokenizer.size}; {data.layout}; {jax.device_count()} devices '
    f'{dict(mesh.shape)}; data ready in {time.perf_counter() - started:.0f} s; '
    + (f'resuming at step {start}.' if start else 'starting.')
  )
  state = train(config, steps, state, data, log, checkpoints, window)
  summary = test(config, steps, state, data, log, checkpoints, window)
  checkpoints.close()
  return summary
