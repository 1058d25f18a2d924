"""The training loop around ``steps``: data, evaluation, checkpoints, the
summary and the plots. ``train_and_evaluate`` reads top to bottom: start
(restoring the workdir's latest checkpoint), train, test. A finished run is
left as it is."""

from __future__ import annotations

import contextlib
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
from interrupts import StopNow, StopRequest
from progress import NonFiniteLoss, Progress, Window


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


class Run(NamedTuple):
  """What the loop and the test share."""

  config: config_lib.Config
  steps: steps_lib.Steps
  data: Data
  log: workdir.MetricsLog
  checkpoints: Checkpoints
  stop: StopRequest


def validate(run: Run, state) -> dict:
  """Logs the validation record of ``state``, checkpointed with its accuracy
  (orbax keeps the best)."""
  data = run.data
  result = evaluate(
    run.steps, state, data.splits['validation'], data.layout, run.config
  )
  record = {'step': int(state['step']), 'split': 'validation', **result}
  run.log.write(record)  # first: a checkpoint's records are all in the log
  with run.stop.saving():
    run.checkpoints.save(state, accuracy=result['accuracy'])
  return record


def train(run: Run, state, window: Window):
  """Steps from ``state`` to ``config.num_steps``: records every
  ``log_every`` steps and at each checkpoint, validates every ``eval_every``,
  checkpoints every ``checkpoint_every`` and at the end. A stop request
  ends the run at the next record, checkpointed."""
  config, steps, stop = run.config, run.steps, run.stop
  start = int(state['step'])
  batches = batches_lib.train_batches(
    run.data.splits['train'], run.data.layout, config, start
  )
  dropout_key = jax.random.key(config.seed + 1)
  progress = Progress(config, run.log.best_accuracy())
  if start < config.num_steps and config.progress:
    print('compiling the train step ...', flush=True)
  for step in range(start + 1, config.num_steps + 1):
    batch = jax.device_put(next(batches), steps.batch_sharding)
    state, sums = steps.train(state, batch, jax.random.fold_in(dropout_key, step))
    window.add(sums, batch)
    if step == start + 1:
      window.restart_clock()  # leaves compilation out of tokens/s
      progress.step(step)
    at_end = step == config.num_steps
    checkpoint = step % config.checkpoint_every == 0 or at_end
    stopping = False
    if step % config.log_every == 0 or checkpoint:
      try:
        record = window.record(step)
      except NonFiniteLoss as error:
        progress.close()
        raise SystemExit(
          f'the loss is not finite at step {error}: training stopped. The last '
          f'good checkpoint is in {config.workdir}/checkpoints (step '
          f'{run.checkpoints.latest_step()}); lower --learning_rate or '
          '--clip_norm (or use --dtype float32) and rerun to resume from it.'
        ) from None
      run.log.write(record)
      progress.step(step)
      progress.show(record)
      stopping = stop.signal is not None
    evaluating = step % config.eval_every == 0 or at_end
    if evaluating:
      progress.show(validate(run, state))
    if checkpoint or stopping:
      with stop.saving():
        run.checkpoints.save(state)
    if evaluating or checkpoint:
      window.restart_clock()  # leaves evaluation and checkpoints out
    if stopping:
      progress.close()
      print(
        f'\nstopped by signal {stop.signal} at step {step}; checkpoint saved. '
        'Run the same command again to resume.'
      )
      raise SystemExit(128 + stop.signal)
  progress.close()
  return state


def test(run: Run, state, window: Window) -> dict:
  """Tests the best validation checkpoint, writes the summary and the plots."""
  config, data, log = run.config, run.data, run.log
  best = run.checkpoints.restore_best(state)
  if best is None:
    print(
      f'warning: no readable best checkpoint in {config.workdir}/checkpoints; '
      f'testing the latest state (step {int(state["step"])}) instead.',
      file=sys.stderr,
    )
    best = state
  result = evaluate(run.steps, best, data.splits['test'], data.layout, config)
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
    plots.write_all(config.workdir, log.records, run.steps.task, best['params'], data)
  summary['wall_seconds'] = window.seconds()
  workdir.write_summary(config.workdir, summary)
  return summary


def start(config, stop: StopRequest, started: float, closing) -> tuple:
  """(run, state, window): the data, the steps and the state restored from
  the workdir's latest checkpoint (or fresh)."""
  mesh = steps_lib.make_mesh(config)
  data = prepare_data(config)
  workdir.create(config, data.tokenizer, data.names, data.fresh)
  task, state = steps_lib.create(config, data.tokenizer.size, len(data.names))
  steps = steps_lib.jit_steps(task, state, mesh)
  checkpoints = Checkpoints(config.workdir, config.keep_checkpoints)
  closing.callback(checkpoints.close)
  state = jax.device_put(state, steps.state_sharding)
  state = checkpoints.restore(state) or state
  begin = int(state['step'])
  if begin > config.num_steps:
    raise config_lib.UserError(
      f'{config.workdir} holds a run at step {begin}, past --num_steps '
      f'{config.num_steps}; give --num_steps {begin} or more.'
    )
  log = workdir.MetricsLog(config.workdir, begin)
  sizes = ' / '.join(f'{len(s)} {name}' for name, s in data.splits.items())
  print(
    f'{sizes} examples, {len(data.names)} classes, vocabulary '
    f'{data.tokenizer.size}; {data.layout}; {jax.device_count()} devices '
    f'{dict(mesh.shape)}; data ready in {time.perf_counter() - started:.0f} s; '
    + (f'resuming at step {begin}.' if begin else 'starting.')
  )
  window = Window(*log.totals(), part_started=started)
  return Run(config, steps, data, log, checkpoints, stop), state, window


def train_and_evaluate(config) -> dict:
  """Trains, tests the best checkpoint and plots; resumes from
  ``config.workdir`` if it holds a run, and returns a finished run's summary
  untouched. Returns the summary (also in ``workdir/summary.json``).

  A signal during training stops it at its next record, checkpointed; a
  second one, or one before training or while testing, stops at once (after
  the checkpoint being written, if one is), with one line that says so.
  """
  config_lib.validate(config)
  workdir.check_config(config)
  finished = workdir.read_summary(config)
  if finished is not None:
    print(f'{config.workdir} holds a finished run of {config.num_steps} steps.')
    return finished
  started = time.perf_counter()
  with StopRequest() as stop, contextlib.ExitStack() as closing:
    stage, stop.at_once = 'before training', True
    try:
      run, state, window = start(config, stop, started, closing)
      stage, stop.at_once = 'at once (a second signal)', False
      state = train(run, state, window)
      stage, stop.at_once = 'while testing (training is finished)', True
      return test(run, state, window)
    except StopNow as stopped:
      print(
        f'\nstopped by signal {stopped.signal} {stage}. Run the same command '
        f'again to resume from the last checkpoint in {config.workdir}/checkpoints.'
      )
      raise SystemExit(128 + stopped.signal) from None
