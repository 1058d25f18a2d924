"""Sampling through jattn's KV caches, and by recomputation for comparison.

- ``dense``: a batch of prompts of one length; prefill, then one byte per
  step with ``decode=True`` (the attention modules' own caches), each step
  jitted once with the model state (caches included) donated.
- ``paged``: a ragged batch (prompts of different lengths) through paged
  caches: ``num_new`` real tokens per sequence, pages allocated as they fill;
  a sequence that has produced the end byte stops writing.
- ``recompute``: the whole prefix through the model at every step (no cache),
  padded to a multiple of ``BUCKET`` so it compiles a few times only.

Every way stops at ``new_tokens`` or the end byte, and uses ``choose``:
greedy at temperature 0, else temperature, top-k and top-p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jattn import cache as kv

from stdlib_bytes import END

BUCKET = 32
PAGE = 16


def choose(logits, key, temperature: float, top_k: int, top_p: float):
  """``logits [B, 256]`` -> ``[B]`` int32 bytes."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  if top_k:
    logits = jnp.where(logits < ordered[:, top_k - 1 : top_k], -jnp.inf, logits)
  if top_p < 1:
    mass = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    cut = jnp.sum(mass - jax.nn.softmax(ordered, axis=-1) < top_p, axis=-1)
    smallest = jnp.take_along_axis(ordered, cut[:, None] - 1, axis=-1)
    logits = jnp.where(logits < smallest, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _finish(out, new_tokens: int):
  """``[B, new_tokens]`` bytes, everything after a first end byte set to END."""
  out = np.asarray(out)[:, :new_tokens]
  ended = np.cumsum(out == END, axis=1) - (out == END) > 0
  return np.where(ended, END, out)


# The steps, jitted once per model structure and sampling settings (static).
_STATIC = dict(static_argnames=('graphdef', 'temperature', 'top_k', 'top_p'))


@functools.partial(jax.jit, donate_argnames='state', **_STATIC)
def _dense_step(graphdef, state, tokens, key, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  start = model.cache_length()
  positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  logits = model(tokens, positions, decode=True)
  return nnx.state(model), choose(logits[:, -1], key, temperature, top_k, top_p)


def dense(model, prompts, new_tokens: int, seed, temperature=0.0, top_k=0, top_p=1.0):
  """``prompts [B, T0]`` int32 (one length) -> ``[B, new_tokens]`` bytes."""
  batch, prompt_len = prompts.shape
  model.init_cache(batch, prompt_len + new_tokens)
  graphdef, state = nnx.split(model)
  pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  out, tokens, ended = [], prompts, np.zeros(batch, bool)
  for key in jax.random.split(seed, new_tokens):
    state, tokens = _dense_step(graphdef, state, tokens, key, **pick)
    out.append(tokens)
    ended |= np.asarray(tokens) == END
    if ended.all():
      break
    tokens = tokens[:, None]
  nnx.update(model, state)
  return _finish(jnp.stack(out, axis=1), new_tokens)


@functools.partial(jax.jit, donate_argnames=('caches', 'free'), **_STATIC)
def _paged_step(graphdef, state, caches, free, tokens, num_new, key, **pick):
  model = nnx.merge(graphdef, state)
  caches = list(caches)
  for i, cache in enumerate(caches):  # every layer's table gets the same pages
    caches[i], layer_free = kv.allocate_pages(cache, num_new, free)
  logits, caches = model.step(tokens, caches, num_new)
  last = jnp.maximum(num_new - 1, 0)
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
  return caches, layer_free, choose(logits, key, **pick)


def paged(
  model, prompts: list, new_tokens: int, seed, temperature=0.0, top_k=0, top_p=1.0
):
  """A ragged batch: ``prompts`` (lists of bytes) -> ``[B, new_tokens]``."""
  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  padded = np.zeros((batch, lengths.max()), np.int32)
  for b, p in enumerate(prompts):
    padded[b, : len(p)] = p
  max_pages = -(-(lengths.max() + new_tokens) // PAGE)
  caches = model.paged_caches(batch, batch * max_pages, PAGE, max_pages)
  free = jnp.ones(batch * max_pages, bool)
  graphdef, state = nnx.split(model)
  pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  out, tokens, num_new = [], jnp.asarray(padded), jnp.asarray(lengths)
  for key in jax.random.split(seed, new_tokens):
    caches, free, chosen = _paged_step(
      graphdef, state, caches, free, tokens, num_new, key, **pick
    )
    chosen = jnp.where(num_new > 0, chosen, END)
    out.append(chosen)
    num_new = (chosen != END).astype(jnp.int32)
    if not bool(num_new.any()):
      break
    tokens = chosen[:, None]
  return _finish(jnp.stack(out, axis=1), new_tokens)


@functools.partial(jax.jit, **_STATIC)
def _forward_pick(graphdef, state, tokens, length, key, **pick):
  """``tokens [B, bucket]`` of which the first ``length`` are real."""
  model = nnx.merge(graphdef, state)
  positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  logits = model(tokens, jnp.broadcast_to(positions, tokens.shape))
  return choose(logits[:, length - 1], key, **pick)


def recompute(
  model, prompts, new_tokens: int, seed, temperature=0.0, top_k=0, top_p=1.0
):
  """``prompts [B, T0]`` -> ``[B, new_tokens]``, the whole prefix each step."""
  batch = prompts.shape[0]
  graphdef, state = nnx.split(model)
  pick = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  prefix, out, ended = np.asarray(prompts), [], np.zeros(batch, bool)
  for key in jax.random.split(seed, new_tokens):
    size = -(-prefix.shape[1] // BUCKET) * BUCKET
    tokens = np.zeros((batch, size), np.int32)
    tokens[:, : prefix.shape[1]] = prefix
    chosen = _forward_pick(
      graphdef, state, jnp.asarray(tokens), prefix.shape[1], key, **pick
    )
    out.append(chosen)
    ended |= np.asarray(chosen) == END
    if ended.all():
      break
    prefix = np.concatenate([prefix, np.asarray(chosen)[:, None]], axis=1)
  return _finish(jnp.stack(out, axis=1), new_tokens)
