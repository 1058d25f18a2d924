"""The pure steps and their shardings: ``train_step``, ``eval_step``, ``predict_step``.

The train state is a plain pytree ``{'step', 'params', 'opt_state'}``; the
model's structure (``nnx.GraphDef``) and the optimizer live in ``Task``, so
the steps are pure functions of arrays, jitted once at the call site
(``jit_steps``) with shardings from ``jattn.sharding`` and the state donated.
Batches are ``batches``' dicts: R rows of W tokens, N example slots per row.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jattn.sharding

import config as config_lib
import model as model_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """What the steps close over: the model's structure and the optimizer."""

  graphdef: nnx.GraphDef
  constants: dict  # non-trainable model state (e.g. sinusoidal positions)
  optimizer: optax.GradientTransformation

  def model(self, params) -> model_lib.Classifier:
    return nnx.merge(self.graphdef, params, self.constants)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to 1%; global-norm clipping; no
  weight decay on biases and LayerNorm scales."""
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


def _metrics(logits, batch):
  """Sums over the real examples: loss, correct predictions, count."""
  labels, weights = batch['labels'], batch['weights']  # [R, N]
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
    logits = task.model(params)(batch, deterministic=False, rngs=nnx.Rngs(dropout=rng))
    sums = _metrics(logits, batch)
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
  """Metric sums of ``batch`` (empty slots have weight 0)."""
  return _metrics(task.model(state['params'])(batch), batch)


def predict_step(task: Task, params, batch):
  """Class probabilities ``[R, N, C]``."""
  return jax.nn.softmax(task.model(params)(batch), axis=-1)


# ---------------------------------------------------------------- sharding


def make_mesh(config, devices=None):
  """A ('data', 'model') mesh over ``devices`` (default all), ``model_axis`` wide."""
  devices = jax.devices() if devices is None else devices
  if config.model_axis < 1 or len(devices) % config.model_axis:
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


def param_specs(params, mesh):
  """PartitionSpecs of the model's parameters, all from ``jattn.sharding``:
  attention heads and MLP hidden units over 'model' (Megatron-style), the
  rest replicated."""
  specs = jax.tree.map(lambda _: P(), params)
  for name, block in params['blocks'].items():
    specs['blocks'][name] = {
      **specs['blocks'][name],
      'attention': jattn.sharding.param_specs(block['attention'], mesh),
      'mlp_in': jattn.sharding.linear_specs(block['mlp_in'], mesh, split='outputs'),
      'mlp_out': jattn.sharding.linear_specs(block['mlp_out'], mesh, split='inputs'),
    }
  return specs


def state_shardings(task: Task, state, mesh):
  """NamedShardings of the train state; the optimizer's moments follow the
  parameters they belong to, its counters are replicated."""
  specs = param_specs(state['params'], mesh)
  opt_specs = optax.tree_utils.tree_map_params(
    task.optimizer,
    lambda _, spec: spec,
    state['opt_state'],
    specs,
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )
  specs = {'step': P(), 'params': specs, 'opt_state': opt_specs}
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
  )


class Steps(NamedTuple):
  """The jitted steps, what they close over, and the shardings of what they take."""

  task: Task
  state_sharding: dict  # a pytree of NamedShardings, like the state
  batch_sharding: NamedSharding  # rows over 'data'
  train: callable  # (state, batch, rng) -> (state, metrics); donates state
  evaluate: callable  # (state, batch) -> metric sums


def jit_steps(task: Task, state, mesh) -> Steps:
  shardings = state_shardings(task, state, mesh)
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
  return Steps(task, shardings, batch, train, evaluate)
