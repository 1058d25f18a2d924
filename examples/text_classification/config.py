"""Every setting of the example, with its default, and the presets.

``main.py`` turns each field into a flag (``--num_layers 6``); a ``--preset``
sets several at once and flags given beside it win.
"""

from __future__ import annotations

import dataclasses


class UserError(ValueError):
  """Something the user can fix (a flag, a file, a workdir): ``main`` prints
  the message as one line on stderr and exits with status 2."""


ATTENTION_CHOICES = ('default', 'flash', 'reference', 'xla', 'cudnn', 'flax')


@dataclasses.dataclass
class Config:
  # Data: ListOps by default; --train_file for local files, or a HF dataset name.
  dataset: str = 'listops'  # 'listops', or a Hugging Face name: imdb, glue/sst2
  train_file: str = ''  # .csv / .tsv / .jsonl with a text and a label column
  val_file: str = ''  # default: split off the training file
  test_file: str = ''  # default: split off the training file
  text_column: str = 'text'
  label_column: str = 'label'
  split_fraction: float = 0.1  # held out for validation / test when no file
  train_size: int = 20_000  # ListOps examples per split
  val_size: int = 1_000
  test_size: int = 2_000
  listops_min_length: int = 16  # tokens, brackets and operators counted
  listops_max_length: int = 128
  tokenizer: str = 'word'  # 'word' (vocabulary from train) or 'byte'
  min_count: int = 1  # word tokenizer: rarer words become [UNK]
  vocab_size: int = 30_000  # word tokenizer: at most this many ids
  max_length: int = 512  # tokens per example, [CLS] included; longer is cut
  bucket_width: int = 16  # batches pad to a multiple of this

  # Model: a pre-LayerNorm Transformer encoder and a linear classifier.
  num_layers: int = 4
  embed_dim: int = 64
  num_heads: int = 4
  mlp_dim: int = 256
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  positions: str = 'learned'  # 'learned' or 'sinusoidal'
  pooling: str = 'cls'  # 'cls' or 'mean' (over the real tokens)
  attention: str = 'default'  # a jattn implementation, or 'flax' to compare
  dtype: str = 'float32'  # compute dtype: 'float32' or 'bfloat16'

  # Training.
  seed: int = 0  # data generation, data order, initialisation and dropout
  batch_size: int = 32  # global, over all devices
  eval_batch_size: int = 256
  num_steps: int = 6_000
  learning_rate: float = 2e-3
  warmup_steps: int = 300
  weight_decay: float = 0.05
  clip_norm: float = 1.0
  model_axis: int = 1  # devices on the 'model' mesh axis (heads, MLP); rest data

  # Outputs.
  workdir: str = 'runs/listops'
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 20
  progress: bool = True  # the tqdm bar


# Flags that may change when a run resumes: they steer how long it runs, what
# it logs and where, not what it computes. Every other flag is bound to the
# run (its data, model, optimiser and randomness), and resuming a workdir with
# a different value is refused.
MAY_CHANGE_ON_RESUME = frozenset(
  {
    'num_steps',
    'workdir',
    'eval_batch_size',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
    'log_every',
    'progress',
    'model_axis',
  }
)


PRESETS = {
  'default': {},
  # Long Range Arena's ListOps settings, for accelerators.
  'lra_listops': dict(
    listops_min_length=500,
    listops_max_length=2000,
    train_size=96_000,
    val_size=2_000,
    test_size=2_000,
    max_length=2048,
    bucket_width=256,
    num_layers=6,
    embed_dim=512,
    num_heads=8,
    mlp_dim=2048,
    batch_size=32,
    eval_batch_size=32,
    num_steps=5_000,
    learning_rate=5e-4,
    warmup_steps=1_000,
    workdir='runs/lra_listops',
  ),
}


def validate(config: Config) -> None:
  """Raises UserError naming the flag for settings that cannot work."""
  choices = {
    'tokenizer': ('word', 'byte'),
    'positions': ('learned', 'sinusoidal'),
    'pooling': ('cls', 'mean'),
    'attention': ATTENTION_CHOICES,
    'dtype': ('float32', 'bfloat16'),
  }
  for name, allowed in choices.items():
    if getattr(config, name) not in allowed:
      raise UserError(
        f'--{name} must be one of {allowed}; got {getattr(config, name)!r}.'
      )
  if config.embed_dim % config.num_heads:
    raise UserError(
      f'--embed_dim {config.embed_dim} must be a multiple of --num_heads '
      f'{config.num_heads}.'
    )
  for name in (
    'batch_size',
    'eval_batch_size',
    'num_steps',
    'max_length',
    'bucket_width',
  ):
    if getattr(config, name) < 1:
      raise UserError(f'--{name} must be positive; got {getattr(config, name)}.')
  if config.max_length < 2:
    raise UserError(
      f'--max_length must leave room for [CLS] and a token; got {config.max_length}.'
    )
