"""A pre-LayerNorm Transformer encoder classifier on ``jattn.nnx.MultiHeadAttention``.

Shapes: R rows, W tokens per row, N example slots per row, E embed_dim,
H heads, C classes. A row may hold several examples (``batches``): segment
ids keep attention inside each example, positions restart at each, and
every example is pooled to its own logits. ``--attention flax`` swaps in
``flax.nnx.MultiHeadAttention`` with the same parameter layout, to compare;
everything else is shared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jattn
import jattn.nnx


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """``[length, dim]``: sin on even features, cos on odd, wavelengths to 10^4."""
  positions = np.arange(length)[:, None]
  rates = np.exp(-np.log(10_000.0) * (np.arange(0, dim, 2) / dim))
  table = np.zeros((length, dim), np.float32)
  table[:, 0::2] = np.sin(positions * rates)
  table[:, 1::2] = np.cos(positions * rates)[:, : dim // 2]
  return table


class EncoderBlock(nnx.Module):
  """x + Attention(LN(x)), then x + MLP(LN(x)); dropout after each branch."""

  def __init__(self, config, dtype, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.attention_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    if config.attention == 'flax':
      self.attention = nnx.MultiHeadAttention(
        config.num_heads,
        dim,
        dropout_rate=config.attention_dropout_rate,
        decode=False,
        dtype=dtype,
        rngs=rngs,
        keep_rngs=False,
      )
    else:
      self.attention = jattn.nnx.MultiHeadAttention(
        config.num_heads,
        dim,
        dropout_rate=config.attention_dropout_rate,
        dtype=dtype,
        implementation=None if config.attention == 'default' else config.attention,
        rngs=rngs,
      )
    self.dtype = dtype
    self.mlp_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, config.mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(config.mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate)

  def attention_weights(self, x, masking: dict):
    """``[R, H, W, W]`` weights of this block's attention on its input ``x``,
    through jattn's public multi-head function on the layer's parameters."""
    params = nnx.to_pure_dict(nnx.state(self.attention, nnx.Param))
    return jattn.multi_head_attention_weights(
      params, self.attention_norm(x), dtype=self.dtype, **masking
    )

  def __call__(self, x, masking: dict, *, deterministic: bool, rngs: nnx.Rngs | None):
    """``[R, W, E] -> [R, W, E]``; ``masking``: ``Classifier.masking``'s."""
    y = self.attention(
      self.attention_norm(x), **masking, deterministic=deterministic, rngs=rngs
    )
    x = x + self.dropout(y, deterministic=deterministic, rngs=rngs)
    y = self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
    return x + self.dropout(y, deterministic=deterministic, rngs=rngs)


class Classifier(nnx.Module):
  """A batch (``batches``: tokens, segments, positions ``[R, W]``) to logits
  ``[R, N, C]``, one per example slot.

  Each example starts with [CLS]; ``pooling`` 'cls' reads it, 'mean' averages
  the example's tokens.
  """

  def __init__(self, config, vocab_size: int, num_classes: int, *, rngs: nnx.Rngs):
    dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
    self.pooling = config.pooling
    self.uses_flax = config.attention == 'flax'
    self.dtype = dtype
    self.embed = nnx.Embed(vocab_size, config.embed_dim, dtype=dtype, rngs=rngs)
    if config.positions == 'learned':
      init = nnx.initializers.normal(0.02)
      self.positions = nnx.Param(
        init(rngs.params(), (config.max_length, config.embed_dim))
      )
    else:
      self.positions = nnx.Variable(
        jnp.asarray(sinusoidal_positions(config.max_length, config.embed_dim))
      )
    self.dropout = nnx.Dropout(config.dropout_rate)
    self.blocks = nnx.List(
      [EncoderBlock(config, dtype, rngs) for _ in range(config.num_layers)]
    )
    self.final_norm = nnx.LayerNorm(config.embed_dim, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(config.embed_dim, num_classes, dtype=dtype, rngs=rngs)

  def embed_tokens(self, batch, *, deterministic: bool, rngs: nnx.Rngs | None):
    """Token and position embeddings ``[R, W, E]``, the first block's input."""
    positions = jnp.take(self.positions[...], batch['positions'], axis=0)
    x = self.embed(batch['tokens']) + positions.astype(self.dtype)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)

  def masking(self, batch) -> dict:
    """The attention options that keep each example to itself: segment ids
    for packed rows; for one example per row, key lengths, which every jattn
    implementation takes; a dense mask for Flax's attention."""
    segments = batch['segments']
    if self.uses_flax:
      return {'mask': jattn.segment_mask(segments)}  # [R, 1, W, W]
    if batch['weights'].shape[1] == 1:
      return {'key_value_seq_lengths': jnp.count_nonzero(segments, axis=1)}
    return {'q_segment_ids': segments, 'kv_segment_ids': segments}

  def pool(self, x, batch):
    """``[R, W, E]`` to ``[R, N, E]``: each slot's [CLS] vector or mean."""
    slots = batch['weights'].shape[1]
    segments, positions = batch['segments'], batch['positions']
    member = segments[:, None, :] == jnp.arange(1, slots + 1)[None, :, None]
    if self.pooling == 'cls':
      member &= (positions == 0)[:, None, :]
    member = member.astype(x.dtype)  # [R, N, W]
    total = jnp.maximum(member.sum(-1, keepdims=True), 1)
    return jnp.einsum('rnw,rwe->rne', member / total, x)

  def __call__(
    self, batch, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
  ):
    x = self.embed_tokens(batch, deterministic=deterministic, rngs=rngs)
    masking = self.masking(batch)
    for block in self.blocks:
      x = block(x, masking, deterministic=deterministic, rngs=rngs)
    pooled = self.pool(self.final_norm(x), batch)
    return self.head(pooled).astype(jnp.float32)

  def attention_maps(self, batch, layer: int):
    """``[R, H, W, W]`` attention weights of block ``layer`` (for plots)."""
    x = self.embed_tokens(batch, deterministic=True, rngs=None)
    masking = self.masking(batch)
    for block in self.blocks[:layer]:
      x = block(x, masking, deterministic=True, rngs=None)
    return self.blocks[layer].attention_weights(x, masking)
