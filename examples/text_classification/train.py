"""Training: a pure ``train_step`` / ``eval_step``, sharding, and the loop.

The state is a plain pytree ``{'step', 'params', 'opt_state'}``; the model's
structure (``nnx.GraphDef``) and optimizer live in ``Task``, so the steps are
pure functions of arrays, jitted once at the call site with shardings and
donation. The loop adds the rest: data, evaluation, checkpoints, signals,
progress, metrics and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn.sharding

import config as config_lib
import data
import model as model_lib
from checkpoints import Checkpoints

# ---------------------------------------------------------------- the pure part


@dataclasses.dataclass(frozen=True)
class Task:
  """What the steps close over: the model's structure and the optimizer."""

  graphdef: nnx.GraphDef
  constants: dict  # non-trainable model state (e.g. sinusoidal positions)
  optimizer: optax.GradientTransformation

  def model(self, params) -> model_lib.Classifier:
    return nnx.merge(self.graphdef, params, self.constants)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay; global-norm clipping; no weight
  decay on biases and LayerNorm scales."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    min(config.warmup_steps, config.num_steps - 1),
    config.num_steps,
    end_value=config.learning_rate * 0.01,
  )
  decays = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(schedule, weight_decay=config.weight_decay, mask=decays),
  )


def create(config, vocab_size: int, num_classes: int):
  """(task, state): a fresh model and optimizer state from ``config.seed``."""
  # Dropout keys come from train_step's rng; the 'dropout' stream here only
  # satisfies constructors that ask for one.
  model = model_lib.Classifier(
    config, vocab_size, num_classes, rngs=nnx.Rngs(params=config.seed, dropout=0)
  )
  graphdef, params, constants = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  task = Task(graphdef, nnx.to_pure_dict(constants), make_optimizer(config))
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'opt_state': task.optimizer.init(params),
  }
  return task, state


def _metrics(logits, labels, weights):
  """Sums over the real rows: loss, correct predictions, count."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {
    'loss_sum': jnp.sum(losses * weights),
    'correct': jnp.sum(correct * weights),
    'count': jnp.sum(weights),
  }


def train_step(task: Task, state, batch, rng):
  """One optimizer step on ``batch``; ``rng`` drives dropout. Returns
  ``(state, metrics)``; metrics are sums over the batch plus ``grad_norm``."""

  def loss_fn(params):
    logits = task.model(params)(
      batch['tokens'],
      batch['lengths'],
      deterministic=False,
      rngs=nnx.Rngs(dropout=rng),
    )
    sums = _metrics(logits, batch['labels'], batch['weights'])
    return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = task.optimizer.update(grads, state['opt_state'], state['params'])
  state = {
    'step': state['step'] + 1,
    'params': optax.apply_updates(state['params'], updates),
    'opt_state': opt_state,
  }
  return state, {**sums, 'grad_norm': optax.tree_utils.tree_norm(grads)}


def eval_step(task: Task, state, batch):
  """Metric sums of ``batch`` (rows with weight 0 are padding)."""
  logits = task.model(state['params'])(batch['tokens'], batch['lengths'])
  return _metrics(logits, batch['labels'], batch['weights'])


def predict_step(task: Task, params, tokens, lengths):
  """Class probabilities ``[B, C]``."""
  return jax.nn.softmax(task.model(params)(tokens, lengths), axis=-1)


# ---------------------------------------------------------------- sharding


def make_mesh(config, devices=None):
  """A ('data', 'model') mesh over ``devices`` (default all), ``model_axis`` wide."""
  devices = jax.devices() if devices is None else devices
  if len(devices) % config.model_axis:
    raise config_lib.UserError(
      f'--model_axis {config.model_axis} does not divide {len(devices)} devices.'
    )
  data_size = len(devices) // config.model_axis
  for name in ('batch_size', 'eval_batch_size'):
    if getattr(config, name) % data_size:
      raise config_lib.UserError(
        f'--{name} {getattr(config, name)} must be a multiple of the {data_size} '
        'devices on the data axis.'
      )
  return jattn.sharding.make_mesh(
    {jattn.sharding.DATA: data_size, jattn.sharding.MODEL: config.model_axis},
    devices=devices,
  )


# Which dimension of a parameter is split over 'model' (Megatron-style: heads of
# attention; the hidden units of the MLP). Keyed by (module, parameter).
_MODEL_DIMS = {
  ('query', 'kernel'): 1,  # [E, H, D]
  ('key', 'kernel'): 1,
  ('value', 'kernel'): 1,
  ('query', 'bias'): 0,  # [H, D]
  ('key', 'bias'): 0,
  ('value', 'bias'): 0,
  ('out', 'kernel'): 0,  # [H, D, E]
  ('mlp_in', 'kernel'): 1,  # [E, M]
  ('mlp_in', 'bias'): 0,  # [M]
  ('mlp_out', 'kernel'): 0,  # [M, E]
}


def _spec(path, leaf, model_size: int) -> P:
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  dim = _MODEL_DIMS.get(tuple(names[-2:]))
  if dim is None or model_size == 1 or leaf.ndim <= dim or leaf.shape[dim] % model_size:
    return P()
  return P(*[jattn.sharding.MODEL if i == dim else None for i in range(leaf.ndim)])


def state_shardings(state, mesh):
  """NamedShardings for the train state: replicated, heads and MLP over 'model'.

  Adam's moments mirror the parameters' paths, so they shard the same way.
  """
  model_size = mesh.shape[jattn.sharding.MODEL]
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: NamedSharding(mesh, _spec(path, leaf, model_size)), state
  )


def jit_steps(task: Task, state, mesh):
  """(train, eval) steps jitted with shardings; the train state is donated."""
  shardings = state_shardings(state, mesh)
  batch = NamedSharding(mesh, P(jattn.sharding.DATA))
  replicated = NamedSharding(mesh, P())
  train = jax.jit(
    lambda state, batch, rng: train_step(task, state, batch, rng),
    in_shardings=(shardings, batch, replicated),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  evaluate = jax.jit(
    lambda state, batch: eval_step(task, state, batch),
    in_shardings=(shardings, batch),
    out_shardings=replicated,
  )
  return shardings, batch, train, evaluate


# ---------------------------------------------------------------- the loop


class _StopRequest:
  """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at a step edge."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second signal: stop at once
      raise KeyboardInterrupt
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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
  return records


class MetricsLog:
  """``workdir/metrics.jsonl``: one JSON record per line, kept across resumes."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    self.records = _read_records(path) if os.path.exists(path) else []
    # Drop what a killed run logged after its last checkpoint (it is redone)
    # and any test result (written again at the end).
    self.records = [
      r
      for r in self.records
      if isinstance(r, dict)
      and r.get('step', resume_step + 1) <= resume_step
      and r.get('split') in ('train', 'validation')
    ]
    with open(path, 'w') as file:
      file.writelines(json.dumps(r) + '\n' for r in self.records)

  def write(self, record: dict) -> None:
    self.records.append(record)
    with open(self.path, 'a') as file:
      file.write(json.dumps(record) + '\n')

  def best_accuracy(self) -> float:
    return max(
      (r['accuracy'] for r in self.records if r['split'] == 'validation'), default=-1.0
    )


def evaluate(evaluate_fn, state, encoded, config, batch_sharding) -> dict:
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in data.eval_batches(encoded, config):
    sums = evaluate_fn(state, jax.device_put(batch, batch_sharding))
    totals = {k: totals[k] + float(v) for k, v in sums.items()}
  count = max(totals['count'], 1.0)
  return {'loss': totals['loss_sum'] / count, 'accuracy': totals['correct'] / count}


def _check_workdir_config(config, path: str) -> None:
  """A workdir holds one run: refuse to resume it with flags that change what
  it computes (all but ``config.MAY_CHANGE_ON_RESUME``)."""
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


def _make_workdir(config, tokenizer, names, fresh: bool) -> None:
  """Creates the workdir (once the run is known to start) and writes the
  config, and the vocabulary and labels of a fresh run."""
  try:
    os.makedirs(config.workdir, exist_ok=True)
    if fresh:
      data.save_vocabulary(config.workdir, tokenizer, names)
    with open(os.path.join(config.workdir, 'config.json'), 'w') as file:
      json.dump(dataclasses.asdict(config), file, indent=1)
  except OSError as error:
    raise config_lib.UserError(
      f'--workdir {config.workdir} cannot be written ({error.strerror or error}).'
    ) from None


def prepare_data(config):
  """(tokenizer, label names, encoded splits, fresh); on resume the vocabulary
  and labels are read from the workdir, else (``fresh``) built from train."""
  splits = data.load_splits(config)
  saved = data.load_vocabulary(config.workdir)
  if saved is not None:
    tokenizer, names = saved
  else:
    tokenizer = data.Tokenizer.build(
      config.tokenizer,
      [e.text for e in splits['train']],
      min_count=config.min_count,
      max_size=config.vocab_size,
    )
    names = data.label_names(splits['train'])
  encoded = {
    name: data.encode(examples, tokenizer, names, config.max_length)
    for name, examples in splits.items()
  }
  return tokenizer, names, encoded, saved is None


def train_and_evaluate(config) -> dict:
  """Trains, evaluates and plots; resumes from ``config.workdir`` if it holds a run.

  Returns the summary (also written to ``workdir/summary.json``).
  """
  from tqdm.auto import tqdm

  config_lib.validate(config)
  started = time.perf_counter()
  _check_workdir_config(config, os.path.join(config.workdir, 'config.json'))
  mesh = make_mesh(config)
  tokenizer, names, encoded, fresh = prepare_data(config)
  _make_workdir(config, tokenizer, names, fresh)

  task, state = create(config, tokenizer.size, len(names))
  shardings, batch_sharding, train_fn, evaluate_fn = jit_steps(task, state, mesh)
  state = jax.device_put(state, shardings)
  checkpoints = Checkpoints(config.workdir, config.keep_checkpoints)
  restored = checkpoints.restore(state)
  if restored is not None:
    state = restored
  start = int(state['step'])
  log = MetricsLog(os.path.join(config.workdir, 'metrics.jsonl'), start)
  best = log.best_accuracy()
  print(
    f'{len(encoded["train"])} train / {len(encoded["validation"])} validation / '
    f'{len(encoded["test"])} test examples, {len(names)} classes, vocabulary '
    f'{tokenizer.size}; {jax.device_count()} devices {dict(mesh.shape)}; data ready '
    f'in {time.perf_counter() - started:.0f} s; '
    + (f'resuming at step {start}.' if start else 'starting.')
  )

  dropout_key = jax.random.key(config.seed + 1)
  batches = data.train_batches(encoded['train'], config, start)
  window = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0, 'grad_norm': 0.0, 'steps': 0}
  pending = []  # device metrics not yet read (reading every step would stall)
  window_tokens, window_start = 0, time.perf_counter()
  steady_tokens, steady_seconds = 0, 0.0
  bar = tqdm(
    total=config.num_steps,
    initial=start,
    disable=not config.progress,
    unit='step',
    dynamic_ncols=True,
  )

  def flush(step: int) -> None:
    """Reads pending metrics; stops on a non-finite loss."""
    nonlocal pending
    first = step - len(pending) + 1
    for offset, sums in enumerate(jax.device_get(pending)):
      for k, v in sums.items():
        window[k] += float(v)
      window['steps'] += 1
      if not math.isfinite(float(sums['loss_sum'])):
        bar.close()
        raise SystemExit(
          f'the loss is not finite at step {first + offset}: training stopped. '
          f'The last good checkpoint is in {config.workdir}/checkpoints (step '
          f'{checkpoints.latest.latest_step()}); lower --learning_rate or '
          '--clip_norm (or use --dtype float32) and rerun to resume from it.'
        )
    pending = []

  with _StopRequest() as stop:
    for step in range(start + 1, config.num_steps + 1):
      batch = next(batches)
      window_tokens += int(batch['lengths'].sum())
      state, sums = train_fn(
        state,
        jax.device_put(batch, batch_sharding),
        jax.random.fold_in(dropout_key, step),
      )
      pending.append(sums)
      bar.update()
      at_end = step == config.num_steps
      if step % config.log_every == 0 or at_end:
        flush(step)
        seconds = time.perf_counter() - window_start
        if step > start + config.log_every:  # the first window holds compilation
          steady_tokens, steady_seconds = (
            steady_tokens + window_tokens,
            steady_seconds + seconds,
          )
        count = max(window['count'], 1.0)
        record = {
          'step': step,
          'split': 'train',
          'loss': window['loss_sum'] / count,
          'accuracy': window['correct'] / count,
          'grad_norm': window['grad_norm'] / max(window['steps'], 1),
          'tokens_per_second': window_tokens / seconds,
          'seconds': time.perf_counter() - started,
        }
        log.write(record)
        bar.set_postfix(
          loss=f'{record["loss"]:.3f}',
          acc=f'{record["accuracy"]:.3f}',
          tok_s=f'{record["tokens_per_second"]:.0f}',
          best_val=f'{max(best, 0):.3f}',
        )
        window = dict.fromkeys(window, 0.0)
        window_tokens = 0
      if step % config.eval_every == 0 or at_end:
        result = evaluate(
          evaluate_fn, state, encoded['validation'], config, batch_sharding
        )
        log.write({'step': step, 'split': 'validation', **result})
        if result['accuracy'] > best:
          best = result['accuracy']
          checkpoints.save(state, best=True)
      if step % config.checkpoint_every == 0 or at_end:
        checkpoints.save(state)
      if step % config.log_every == 0:
        window_start = time.perf_counter()
      # A stop request waits for the end of a logging window, so that the
      # resumed run's metrics match an uninterrupted run's.
      if stop.signal is not None and (step % config.log_every == 0 or at_end):
        checkpoints.save(state)
        checkpoints.close()
        bar.close()
        print(
          f'\nstopped by signal {stop.signal} at step {step}; checkpoint saved. '
          'Run the same command again to resume.'
        )
        raise SystemExit(128 + stop.signal)
  bar.close()

  # The best validation checkpoint is the model we test.
  best_state = checkpoints.restore(state, best=True)
  if best_state is None:
    print(
      f'warning: no readable checkpoint in {config.workdir}/best; testing the '
      f'latest state (step {int(state["step"])}) instead.',
      file=sys.stderr,
    )
    best_state = state
  test = evaluate(evaluate_fn, best_state, encoded['test'], config, batch_sharding)
  log.write({'step': int(best_state['step']), 'split': 'test', **test})
  train_labels = np.bincount(encoded['train'].labels, minlength=len(names))
  majority = int(np.argmax(train_labels))
  summary = {
    'best_validation_accuracy': best,
    'best_step': int(best_state['step']),
    'test_accuracy': test['accuracy'],
    'majority_class_test_accuracy': float(np.mean(encoded['test'].labels == majority)),
    'wall_seconds': time.perf_counter() - started,
    'train_tokens_per_second': steady_tokens / steady_seconds
    if steady_seconds
    else None,
    'steps': config.num_steps,
    'devices': jax.device_count(),
  }
  with open(os.path.join(config.workdir, 'summary.json'), 'w') as file:
    json.dump(summary, file, indent=1)
  checkpoints.close()
  try:
    import plots
  except ImportError:  # matplotlib is in the 'examples' extra
    print("no plots: pip install -e '.[examples]' for matplotlib")
  else:
    plots.write_all(
      config.workdir,
      log.records,
      task,
      best_state['params'],
      encoded['test'],
      tokenizer,
      names,
    )
  return summary
