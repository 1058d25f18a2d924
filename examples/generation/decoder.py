"""A decoder-only byte-level Transformer on ``jattn.nnx.MultiHeadAttention``.

Pre-norm blocks: causal self-attention with GQA (H query heads share K
key/value heads) and an MLP. Learned positions count from each document's
first byte. Three ways to run it, one set of weights:

- ``__call__(tokens, positions, segment_ids)``: training and recomputation,
  causal within each packed document (``q_segment_ids``);
- ``__call__(..., decode=True)``: one cached step through the attention
  modules' own dense caches (``init_cache`` first), as ``flax.nnx`` decodes;
- ``step(tokens, caches, num_new)``: the pure cached step of
  ``jattn.cache.multi_head_attention_step`` over caches passed in (dense or
  paged; ragged batches: ``num_new`` real tokens per sequence).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import jattn
from jattn import cache as kv

VOCAB = 256  # bytes


class Block(nnx.Module):
  def __init__(self, settings, rngs: nnx.Rngs):
    width = settings.embed_dim
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = jattn.nnx.MultiHeadAttention(
      settings.num_heads, width, num_kv_heads=settings.num_kv_heads, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, settings.mlp_dim, rngs=rngs)
    self.down = nnx.Linear(settings.mlp_dim, width, rngs=rngs)

  def _mlp(self, x):
    return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))

  def __call__(self, x, segment_ids=None, decode: bool = False):
    h = self.attention_norm(x)
    if decode:
      x = x + self.attention(h, decode=True)
    else:
      x = x + self.attention(h, is_causal=True, q_segment_ids=segment_ids)
    return self._mlp(x)

  def step(self, x, cache, num_new):
    params = self.attention.to_params()
    h = self.attention_norm(x)
    out, cache = kv.multi_head_attention_step(params, h, cache, num_new=num_new)
    return self._mlp(x + out), cache


class Decoder(nnx.Module):
  def __init__(self, settings, rngs: nnx.Rngs):
    self.max_length = settings.length
    self.embed = nnx.Embed(VOCAB, settings.embed_dim, rngs=rngs)
    self.position = nnx.Embed(settings.length, settings.embed_dim, rngs=rngs)
    self.blocks = nnx.List([Block(settings, rngs) for _ in range(settings.num_layers)])
    self.norm = nnx.LayerNorm(settings.embed_dim, rngs=rngs)
    self.head = nnx.Linear(settings.embed_dim, VOCAB, rngs=rngs)

  def _inputs(self, tokens, positions):
    positions = jnp.minimum(positions, self.max_length - 1)
    return self.embed(tokens) + self.position(positions)

  def __call__(self, tokens, positions, segment_ids=None, decode: bool = False):
    """``tokens [B, T]`` int32 bytes at ``positions [B, T]`` -> ``[B, T, 256]``."""
    x = self._inputs(tokens, positions)
    for block in self.blocks:
      x = block(x, segment_ids, decode)
    return self.head(self.norm(x))

  def init_cache(self, batch: int, capacity: int) -> None:
    """Empty dense caches in the attention modules, for ``decode=True``."""
    for block in self.blocks:
      block.attention.init_cache((batch, capacity, self.embed.features))

  def cache_length(self):
    """``[B]`` tokens the modules' caches hold (the next position)."""
    return self.blocks[0].attention.cache_lengths[...]

  def step(self, tokens, caches, num_new=None):
    """One pure cached step: ``tokens [B, T]`` after what ``caches`` (one
    per block) hold -> ``(logits [B, T, 256], caches)``."""
    start = caches[0].lengths
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x = self._inputs(tokens, positions)
    new = []
    for block, cache in zip(self.blocks, caches, strict=True):
      x, cache = block.step(x, cache, num_new)
      new.append(cache)
    return self.head(self.norm(x)), new

  def attention_params(self) -> list[dict]:
    return [block.attention.to_params() for block in self.blocks]

  def dense_caches(self, batch: int, capacity: int) -> list:
    return [kv.init_cache(p, batch, capacity) for p in self.attention_params()]

  def paged_caches(self, batch, num_pages, page_size, max_pages) -> list:
    return [
      kv.init_paged_cache(p, batch, num_pages, page_size, max_pages)
      for p in self.attention_params()
    ]
