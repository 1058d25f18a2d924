"""The platform's fused attention: ``jax.nn.dot_product_attention`` (XLA, and
cuDNN on NVIDIA GPUs) where its arguments fit.

It knows causal, window, lengths, a mask, a bias and GQA, and needs V == D.
``supports`` is an allow-list: any other rule or option (segment ids,
chunks, prefixes, soft-capping, dropout, and whatever is added later) is a
reason it cannot take the call. Its fully-masked rows return the mean of V;
here they are zeroed, as everywhere in jattn, with the visibility value
saying which rows those are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn import masks
from jattn._heads import map_heads
from jattn._types import Prepared, options_given
from jattn._visibility import refused

# cuDNN's fused attention takes half precision and head dims up to 128 in
# multiples of 8.
_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

# What jax.nn.dot_product_attention expresses (the visibility value's rules
# and arrays, the options); q_size and kv_size (the real rows and keys) are the
# lengths it is given; the batch and head indices change nothing.
_RULES = {
  'is_causal',
  'window',
  'query_seq_lengths',
  'key_value_seq_lengths',
  'mask',
  'q_size',
  'kv_size',
  'batch_index',
  'head_index',
}
_OPTIONS = {
  'scale',
  'is_causal',
  'window',
  'implementation',
  'block_sizes',
  'return_residual',
}


def _bias_and_mask(p: Prepared):
  """(bias, mask) for jax.nn: a ``-inf`` bias entry becomes a hidden key.

  jax.nn adds the bias after masking with a finite large negative, so a row
  of ``-inf`` bias would be NaN there; here it is a row with nothing to see.
  """
  if p.bias is None:
    return None, p.vis.mask
  bias = p.bias.astype(jnp.float32)
  hidden = bias == -jnp.inf
  return jnp.where(hidden, 0.0, bias), masks.combine_masks(p.vis.mask, ~hidden)


def gpu_capability() -> tuple[int, ...]:
  """The first GPU's CUDA compute capability, e.g. (9, 0) on a Hopper."""
  device = jax.devices('gpu')[0]
  return tuple(int(x) for x in device.compute_capability.split('.'))


def _cudnn_reasons(p: Prepared) -> list[str]:
  """What cuDNN's fused attention, as ``jax.nn`` calls it, cannot take
  beyond the rules both share."""
  reasons = []
  if p.backend != 'gpu':
    reasons.append(f'the {p.backend!r} backend (cuDNN needs an NVIDIA GPU)')
  if jnp.dtype(p.q.dtype) not in _CUDNN_DTYPES:
    reasons.append(f'{p.q.dtype} inputs (cuDNN takes float16 or bfloat16)')
  # Hopper (compute capability 9.0) and later take head dims up to 256.
  most = 256 if p.backend == 'gpu' and gpu_capability() >= (9, 0) else 128
  head_dim = p.q.shape[-1]
  if head_dim > most or head_dim % 8:
    reasons.append(
      f'head dim D={head_dim} (cuDNN on this GPU: a multiple of 8 up to {most})'
    )
  window = p.vis.window
  if window is not None and window[1] > 0 and not p.vis.is_causal:
    reasons.append(f'local_window_size={window} (cuDNN: left windows only)')
  q_len, kv_len = p.q.shape[1], p.k.shape[1]
  if p.bias is not None and (q_len % 2 or kv_len % 2):
    reasons.append(f'a bias with T={q_len}, S={kv_len} (its backward needs both even)')
  return reasons


class Xla:
  """``jax.nn.dot_product_attention(implementation=name)`` behind the kernel
  contract (see ``_registry``); ``name`` is 'xla' or 'cudnn'."""

  def __init__(self, name: str):
    self.name = name

  def supports(self, p: Prepared) -> list[str]:
    reasons = _cudnn_reasons(p) if self.name == 'cudnn' else []
    unsupported = refused(p.vis.given(), _RULES)
    unsupported += refused(options_given(p.opts), _OPTIONS)
    reasons += unsupported
    reasons += [
      name
      for name, default in Prepared._field_defaults.items()
      if default is None and getattr(p, name) is not None
    ]  # optional operands (sinks): none taught here
    if p.v.shape[-1] != p.k.shape[-1]:
      reasons.append(f'value head dim V={p.v.shape[-1]} != D={p.k.shape[-1]}')
    return reasons

  def preferred(self, p: Prepared) -> bool:
    """cuDNN turns a dense mask into a ``[B, H, T, S]`` bias: the automatic
    choice leaves such calls to flash (an explicit 'cudnn' takes them)."""
    return self.name != 'cudnn' or p.vis.mask is None

  def __call__(self, p: Prepared):
    as_int32 = lambda x: None if x is None else x.astype(jnp.int32)
    bias, mask = _bias_and_mask(p)
    # jax.nn lowers bf16/fp16 dots with an algorithm preset that breaks under
    # jax_numpy_dtype_promotion='strict' (forward and backward); float32 inputs
    # avoid it and give the float32 accuracy jattn promises anyway.
    q, k, v = p.q, p.k, p.v
    if self.name == 'xla':
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    vis = p.vis.replace(mask=mask)
    out, lse = jax.nn.dot_product_attention(
      q,
      k,
      v,
      bias,
      mask,
      scale=p.opts.scale,
      is_causal=vis.is_causal,
      query_seq_lengths=as_int32(vis.query_seq_lengths),
      key_value_seq_lengths=as_int32(vis.key_value_seq_lengths),
      local_window_size=vis.window,
      implementation=self.name,
      return_residual=True,
    )
    out, lse = out.astype(p.q.dtype), lse.astype(jnp.float32)
    if (
      mask is None
      and vis.window is None
      and vis.key_value_seq_lengths is None
      and vis.query_seq_lengths is None
    ):
      return out, lse  # top-left causal alone never empties a row
    q_size, kv_size = p.q.shape[1], p.k.shape[1]
    rows = map_heads(
      lambda q, k, v, b, vis, seed: vis.rows_with_keys(q_size, kv_size),
      p.q,
      p.k,
      p.k,
      None,
      vis,
      None,
      out_axis=1,
    )  # [B, T, K, G]
    rows = rows.reshape(rows.shape[:2] + (-1,))
    out = jnp.where(rows[..., None], out, jnp.zeros((), out.dtype))
    return out, jnp.where(rows, lse, -jnp.inf)
