"""jattn: multi-head self-attention for JAX, the functional way.

Public API: ``dot_product_attention`` and ``attention_weights`` (the core),
``init_params``, ``multi_head_attention`` and
``multi_head_attention_weights`` (multi-head functions over a parameter
pytree), the mask helpers, ``create_block_mask`` and ``BlockMask`` (the
blocks a ``mask_mod`` skips), ``flax_attention_fn`` (an ``attention_fn`` for
Flax's modules); submodules ``jattn.cache`` (key/value caches and the
inference step: prefill and decode, dense and paged), ``jattn.mods`` (ready
mask and score functions: ALiBi, T5 buckets, documents), ``jattn.nnx`` and
``jattn.linen`` (Flax wrappers), ``jattn.sharding`` (meshes, specs, ring attention) and
``jattn.testing`` (equivalence helpers).
"""

from jattn import cache, linen, mods, nnx, sharding, testing
from jattn.attention import attention_weights, dot_product_attention
from jattn.block_mask import BlockMask, create_block_mask
from jattn.flax_compat import flax_attention_fn
from jattn.masks import (
  causal_mask,
  combine_masks,
  local_window_mask,
  padding_mask,
  segment_mask,
)
from jattn.multihead import (
  init_params,
  multi_head_attention,
  multi_head_attention_weights,
  param_shapes,
)

__version__ = '0.1.0'

__all__ = [
  'BlockMask',
  'attention_weights',
  'cache',
  'causal_mask',
  'combine_masks',
  'create_block_mask',
  'dot_product_attention',
  'flax_attention_fn',
  'init_params',
  'linen',
  'local_window_mask',
  'mods',
  'multi_head_attention',
  'multi_head_attention_weights',
  'nnx',
  'padding_mask',
  'param_shapes',
  'segment_mask',
  'sharding',
  'testing',
]
