"""What the Flax wrappers (``jattn.nnx``, ``jattn.linen``) share: their
settings checked when a module is built, and passed to the pure functions."""

from __future__ import annotations

from jattn import _options, _registry


def check_settings(dropout_rate, deterministic, implementation, *, allow_none: bool):
  """A module's static settings, checked when it is built (not at a call)."""
  return (
    _options.check_dropout_rate(dropout_rate),
    _options.as_bool(deterministic, 'deterministic', allow_none=allow_none),
    _registry.check_implementation(implementation),
  )


def settings(module, dropout_rng, deterministic) -> dict:
  """What a Flax wrapper passes to ``multi_head_attention`` besides its
  inputs: its compute dtype, dropout and implementation."""
  return dict(
    dtype=module.dtype,
    dropout_rate=module.dropout_rate,
    dropout_rng=dropout_rng,
    deterministic=deterministic,
    implementation=module.implementation,
  )
