"""A pre-LayerNorm Transformer encoder classifier on ``jattn.nnx.MultiHeadAttention``.

Shapes: B batch, T tokens (padded), E embed_dim, H heads, C classes.
``--attention flax`` swaps in ``flax.nnx.MultiHeadAttention`` with the same
parameter layout, for comparison; everything else is shared.
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
    self.uses_flax = config.attention == 'flax'
    self.mlp_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, config.mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(config.mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(config.dropout_rate)

  def attend(self, x, lengths, *, deterministic, rngs):
    """Self-attention of ``x`` ``[B, T, E]`` over each row's first ``lengths``."""
    if self.uses_flax:
      valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
      return self.attention(
        x, mask=valid[:, None, None, :], deterministic=deterministic, rngs=rngs
      )
    return self.attention(
      x, key_value_seq_lengths=lengths, deterministic=deterministic, rngs=rngs
    )

  def __call__(self, x, lengths, *, deterministic: bool, rngs: nnx.Rngs | None):
    y = self.attend(
      self.attention_norm(x), lengths, deterministic=deterministic, rngs=rngs
    )
    x = x + self.dropout(y, deterministic=deterministic, rngs=rngs)
    y = self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))
    return x + self.dropout(y, deterministic=deterministic, rngs=rngs)


class Classifier(nnx.Module):
  """Token ids ``[B, T]`` and lengths ``[B]`` to class logits ``[B, C]``.

  Position 0 holds [CLS]; rows are padded past ``lengths``.
  """

  def __init__(self, config, vocab_size: int, num_classes: int, *, rngs: nnx.Rngs):
    dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
    self.pooling = config.pooling
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

  def embed_tokens(self, tokens, *, deterministic: bool, rngs: nnx.Rngs | None):
    """``[B, T]`` ids to ``[B, T, E]`` inputs of the first block."""
    positions = self.positions[None, : tokens.shape[1]]  # [1, T, E]
    x = self.embed(tokens) + positions.astype(self.dtype)
    return self.dropout(x, deterministic=deterministic, rngs=rngs)

  def __call__(
    self, tokens, lengths, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
  ):
    x = self.embed_tokens(tokens, deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x = block(x, lengths, deterministic=deterministic, rngs=rngs)
    x = self.final_norm(x)
    if self.pooling == 'cls':
      pooled = x[:, 0]
    else:
      valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
      valid = valid.astype(x.dtype)
      pooled = jnp.einsum('bte,bt->be', x, valid) / jnp.maximum(
        valid.sum(1, keepdims=True), 1
      )
    return self.head(pooled).astype(jnp.float32)

  def attention_maps(self, tokens, lengths, layer: int):
    """``[B, H, T, T]`` attention weights of block ``layer`` (for plots)."""
    x = self.embed_tokens(tokens, deterministic=True, rngs=None)
    for block in self.blocks[:layer]:
      x = block(x, lengths, deterministic=True, rngs=None)
    attention = self.blocks[layer].attention
    x = self.blocks[layer].attention_norm(x)
    project = lambda p: (
      jnp.einsum('bte,ehd->bthd', x, p.kernel[...]) + p.bias[None, None]
    )
    return jattn.attention_weights(
      project(attention.query), project(attention.key), key_value_seq_lengths=lengths
    )
