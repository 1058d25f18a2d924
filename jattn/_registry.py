"""Which kernel takes a call: one registry, one contract.

A kernel has a ``name``, ``supports(p) -> reasons`` (an empty list when it
can take the prepared call ``p``) and ``__call__(p) -> (out [B, T, H, V],
lse [B, T, H])`` (lse may be None for a kernel that refuses
``return_residual``); optionally ``preferred(p)``, whether the automatic choice
should take a call it supports (default yes). The automatic choice is a
policy per backend: the first kernel of ``AUTO[p.backend]`` that supports
and prefers the call; an explicit choice that cannot take it is a
``ValueError`` quoting its reasons.
"""

from __future__ import annotations

from jattn._decode import Decode
from jattn._flash import Flash
from jattn._reference import Reference
from jattn._splash import Splash
from jattn._types import Prepared
from jattn._xla import Xla

KERNELS = {
  k.name: k
  for k in (Flash(), Reference(), Xla('xla'), Xla('cudnn'), Decode(), Splash())
}
# The automatic choice by backend: decode for few queries against many keys;
# on a GPU cuDNN where it fits (half precision, ...), on a TPU splash where
# it can express the call; else flash, which takes every call.
AUTO = {
  'gpu': ('decode', 'cudnn', 'flash'),
  'cpu': ('decode', 'flash'),
  'tpu': ('decode', 'splash', 'flash'),
}


def check_implementation(implementation) -> str | None:
  """None (automatic) or the name of a kernel in the registry."""
  names = (None, *KERNELS)
  if implementation not in names:
    raise ValueError(
      f'`implementation` must be one of {names}; got {implementation!r}.'
    )
  return implementation


def _takes(kernel, p: Prepared) -> bool:
  preferred = getattr(kernel, 'preferred', lambda p: True)
  return not kernel.supports(p) and preferred(p)


def _reasons(kernel, p: Prepared, lse_gradient: bool) -> list[str]:
  reasons = kernel.supports(p)
  if lse_gradient and not getattr(kernel, 'lse_gradient', False):
    reasons = [*reasons, 'a log-sum-exp with a gradient (it returns none)']
  return reasons


def select(p: Prepared, *, lse_gradient: bool = False):
  """The kernel for ``p`` (``p.opts.implementation`` None: automatic);
  ``lse_gradient``: one whose log-sum-exp is differentiable."""
  name = p.opts.implementation
  if name is None:
    order = AUTO.get(p.backend, ('flash',))
    return next(
      KERNELS[n]
      for n in order
      if not _reasons(KERNELS[n], p, lse_gradient) and _takes(KERNELS[n], p)
    )
  reasons = _reasons(KERNELS[name], p, lse_gradient)
  if reasons:
    others = [
      n for n, k in KERNELS.items() if n != name and not _reasons(k, p, lse_gradient)
    ]
    raise ValueError(
      f'implementation={name!r} cannot take this call: {"; ".join(reasons)}. '
      f'These can: {others} (or None for the automatic choice).'
    )
  return KERNELS[name]
