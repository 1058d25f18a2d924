"""Training: next-byte cross-entropy on packed rows, AdamW, orbax checkpoints.

The train state is a plain pytree (``step``, the parameters as a pure dict,
the optimizer state) saved by orbax every ``eval_every`` steps in
``workdir/checkpoints``; a rerun resumes from the newest one, and the batch
of step ``n`` depends only on the seed and ``n``, so an interrupted run that
resumes ends with the same parameters as one that was not interrupted.
Validation bits per byte go to ``workdir/metrics.jsonl``.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import decoder as decoder_lib
import stdlib_bytes


class Trainer:
  """The model's structure, the optimizer and the jitted steps."""

  def __init__(self, settings):
    self.settings = settings
    model = decoder_lib.Decoder(settings, nnx.Rngs(settings.seed))
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.abstract = params
    warmup = min(settings.warmup_steps, settings.num_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, warmup, max(settings.num_steps, warmup + 1)
    )
    self.optimizer = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    self.initial_params = nnx.to_pure_dict(params)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self.loss = jax.jit(self._loss)

  def model(self, params) -> decoder_lib.Decoder:
    state = jax.tree.map(lambda x: x, self.abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self.rest)

  def init_state(self) -> dict:
    """A fresh state (its own buffers: a train step donates them)."""
    params = jax.tree.map(jnp.copy, self.initial_params)
    return {'step': jnp.int32(0), 'params': params, 'opt': self.optimizer.init(params)}

  def _loss(self, params, batch):
    """Mean next-byte cross-entropy (nats) over the weighted targets."""
    model = self.model(params)
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return (losses * batch['weights']).sum() / batch['weights'].sum()

  def _train_step(self, state, batch):
    loss, grads = jax.value_and_grad(self._loss)(state['params'], batch)
    updates, opt = self.optimizer.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'step': state['step'] + 1, 'params': params, 'opt': opt}, loss


def batch_of_step(train: stdlib_bytes.Split, settings, step: int) -> dict:
  """The rows of step ``step``: a function of the seed and the step only."""
  rng = np.random.default_rng([settings.seed, step])
  return train.random_rows(rng, settings.batch_size, settings.length)


def checkpoints(workdir: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=2, enable_async_checkpointing=False, create=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options
  )


def _metrics(workdir: str, upto: int) -> list[dict]:
  """The validation records of steps up to ``upto`` (a resumed run drops
  the ones after its checkpoint)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as file:
    records = [json.loads(line) for line in file if line.strip()]
  return [r for r in records if r['step'] <= upto]


def write_records(workdir: str, records: list[dict]) -> None:
  """``metrics.jsonl`` replaced whole (a kill mid-write leaves the old one)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path + '.tmp', 'w') as file:
    file.writelines(json.dumps(r) + '\n' for r in records)
  os.replace(path + '.tmp', path)


@functools.lru_cache(maxsize=4)
def trainer_for(settings) -> Trainer:
  """One ``Trainer`` (so one compilation) per settings in a process."""
  return Trainer(settings)


def train(settings, data: dict, workdir: str, until: int | None = None):
  """Trains (or resumes) to ``settings.num_steps``: ``(trainer, state,
  validation records)``. ``until``: stop after that step's checkpoint, as
  a run interrupted there would (tests)."""
  trainer = trainer_for(settings)
  manager = checkpoints(workdir)
  state = trainer.init_state()
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    print(f'resuming at step {int(state["step"])}')
  start = int(state['step'])
  records = _metrics(workdir, start)
  validation = jax.tree.map(
    jnp.asarray, data['validation'].fixed_rows(settings.eval_rows, settings.length)
  )
  evaluate = functools.partial(trainer.loss, batch=validation)
  bar = None
  started = time.perf_counter()
  for step in range(start, settings.num_steps):
    batch = jax.tree.map(jnp.asarray, batch_of_step(data['train'], settings, step))
    state, loss = trainer.train_step(state, batch)
    if bar is None and settings.progress:  # after the first step's compilation
      bar = tqdm(total=settings.num_steps, initial=step + 1, unit='step')
    elif bar is not None:
      bar.update(1)
    done = step + 1
    if done % settings.eval_every == 0 or done == settings.num_steps:
      record = {
        'step': done,
        'train_bits_per_byte': stdlib_bytes.bits_per_byte(float(loss)),
        'validation_bits_per_byte': stdlib_bytes.bits_per_byte(
          float(evaluate(state['params']))
        ),
        'seconds': time.perf_counter() - started,
      }
      records.append(record)
      manager.save(done, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
      write_records(workdir, records)
      if bar is not None:
        bar.set_postfix(val_bpb=f'{record["validation_bits_per_byte"]:.3f}')
      if done == until:
        break
  if bar is not None:
    bar.close()
  manager.close()
  return trainer, state, records
