"""Every setting of the generation example: its default and what it does.

Each field of ``Settings`` is a flag (``--num_layers 4``); ``main.py``
builds ``--help`` from the fields' descriptions and ``check`` refuses what
cannot run, as one line.
"""

from __future__ import annotations

import dataclasses


class UserError(ValueError):
  """Something the user can fix: ``main`` prints it as one line and exits 2."""


def setting(default, help: str, choices: tuple | None = None):
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class Settings:
  # Data: the byte sequences of this Python's own standard library sources.
  max_files: int = setting(0, 'use only the first N source files (0: all)')
  length: int = setting(256, 'bytes per training row (documents packed)')
  # Model: a decoder-only Transformer on jattn.nnx.MultiHeadAttention.
  num_layers: int = setting(3, 'Transformer blocks')
  embed_dim: int = setting(128, 'model width E')
  num_heads: int = setting(4, 'query heads H')
  num_kv_heads: int = setting(2, 'key/value heads K (GQA: H/K query heads share one)')
  mlp_dim: int = setting(512, 'hidden width of each MLP')
  # Training.
  batch_size: int = setting(16, 'rows per step')
  num_steps: int = setting(1500, 'training steps')
  learning_rate: float = setting(2e-3, 'peak learning rate (AdamW, cosine decay)')
  warmup_steps: int = setting(100, 'linear warm-up steps')
  eval_every: int = setting(250, 'steps between validations (and checkpoints)')
  eval_rows: int = setting(64, 'validation rows of --length bytes')
  seed: int = setting(0, 'initialisation, data order and sampling')
  # Sampling through the KV caches.
  prompts: str = setting(
    'def |import |class Cache:\n    def ',
    'prompts, separated by "|", sampled as one ragged batch',
  )
  new_tokens: int = setting(120, 'bytes to generate per prompt (or until the end byte)')
  temperature: float = setting(0.8, 'sampling temperature (0: greedy)')
  top_k: int = setting(0, 'keep the k most likely bytes (0: all)')
  top_p: float = setting(0.95, 'keep the most likely bytes up to this mass (1: all)')
  workdir: str = setting('runs/generation', 'checkpoints, metrics, figures, plots')
  progress: bool = setting(True, 'progress bars (after compilation)')


def check(settings: Settings) -> None:
  """One line per problem a flag can cause, before anything runs."""
  s = settings
  positive = (
    'length', 'num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'mlp_dim',
    'batch_size', 'num_steps', 'eval_every', 'eval_rows',
  )  # fmt: skip
  for name in positive:
    if getattr(s, name) < 1:
      raise UserError(f'--{name} must be at least 1; got {getattr(s, name)}.')
  if s.max_files < 0 or s.warmup_steps < 0 or s.new_tokens < 0:
    raise UserError('--max_files, --warmup_steps and --new_tokens must be >= 0.')
  if s.embed_dim % s.num_heads or s.num_heads % s.num_kv_heads:
    raise UserError(
      f'--embed_dim ({s.embed_dim}) must be a multiple of --num_heads '
      f'({s.num_heads}), and that of --num_kv_heads ({s.num_kv_heads}).'
    )
  if not s.learning_rate > 0 or s.temperature < 0 or not 0 < s.top_p <= 1:
    raise UserError(
      '--learning_rate must be > 0, --temperature >= 0 and --top_p in (0, 1].'
    )
  if s.top_k < 0 or s.top_k > 256:
    raise UserError(f'--top_k must be in 0..256; got {s.top_k}.')
  prompts = s.prompts.split('|')
  longest = max(len(p.encode()) for p in prompts)
  if not all(prompts) or longest + s.new_tokens > s.length:
    raise UserError(
      f'each prompt must be non-empty, and prompt + --new_tokens at most '
      f'--length ({s.length}) bytes; the longest prompt has {longest}.'
    )
