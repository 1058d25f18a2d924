"""Every setting of the example: its default, its allowed values, what it does.

Each field of ``Config`` is a flag (``--num_layers 6``); ``main.py`` builds
``--help`` from the fields' own descriptions, and ``validate`` checks their
allowed values, so a setting is described in exactly one place. A
``--preset`` sets several at once; flags given beside it win.
"""

from __future__ import annotations

import dataclasses


class UserError(ValueError):
  """Something the user can fix (a flag, a file, a workdir): ``main`` prints
  the message as one line on stderr and exits with status 2."""


def setting(default, help: str, choices: tuple | None = None):
  """A Config field with its one-line description and allowed values."""
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


ATTENTION_CHOICES = ('default', 'flash', 'reference', 'xla', 'cudnn', 'flax')


@dataclasses.dataclass
class Config:
  # Data: ListOps by default; --train_file for local files, or a HF dataset name.
  dataset: str = setting(
    'listops',
    "'listops' (generated offline) or a Hugging Face name such as imdb, "
    "ag_news, glue/sst2 (needs the 'datasets' extra)",
  )
  train_file: str = setting('', 'a .csv, .tsv or .jsonl file with a text and a label')
  val_file: str = setting('', 'validation file; default: split off --train_file')
  test_file: str = setting('', 'test file; default: split off --train_file')
  text_column: str = setting('text', 'the column (or JSON key) of the text')
  label_column: str = setting('label', 'the column (or JSON key) of the label')
  split_fraction: float = setting(
    0.1, 'share of --train_file held out for validation and for test'
  )
  train_size: int = setting(60_000, 'ListOps training examples')
  val_size: int = setting(1_000, 'ListOps validation examples')
  test_size: int = setting(2_000, 'ListOps test examples')
  listops_min_length: int = setting(16, 'shortest ListOps expression, in tokens')
  listops_max_length: int = setting(128, 'longest ListOps expression, in tokens')
  tokenizer: str = setting(
    'word',
    'word: a vocabulary of the training split; byte: UTF-8 bytes',
    ('word', 'byte'),
  )
  min_count: int = setting(1, 'word tokenizer: rarer words become [UNK]')
  vocab_size: int = setting(30_000, 'word tokenizer: at most this many ids')
  max_length: int = setting(
    512, 'tokens per example, [CLS] included; longer texts are cut'
  )
  pack: bool = setting(
    True,
    'pack several examples into each row (segment ids keep them apart); '
    '--no-pack: one example per row, padded',
  )
  bucket_width: int = setting(16, 'rows are padded to a multiple of this many tokens')

  # Model: a pre-LayerNorm Transformer encoder and a linear classifier.
  num_layers: int = setting(4, 'Transformer blocks')
  embed_dim: int = setting(64, 'model width E')
  num_heads: int = setting(4, 'attention heads H (they divide --embed_dim)')
  mlp_dim: int = setting(256, 'hidden units of each MLP')
  dropout_rate: float = setting(0.0, 'dropout after embeddings and each block')
  attention_dropout_rate: float = setting(0.0, 'dropout on the attention weights')
  positions: str = setting('learned', 'position embeddings', ('learned', 'sinusoidal'))
  pooling: str = setting(
    'cls',
    "an example's vector: its [CLS] token, or the mean of its tokens",
    ('cls', 'mean'),
  )
  attention: str = setting(
    'default',
    "a jattn implementation ('default' lets jattn choose), or flax for "
    'flax.nnx.MultiHeadAttention, to compare',
    ATTENTION_CHOICES,
  )
  dtype: str = setting(
    'float32',
    'compute dtype (parameters stay float32)',
    ('float32', 'bfloat16'),
  )

  # Training.
  seed: int = setting(0, 'seeds the data, its order, the initialisation and dropout')
  batch_size: int = setting(16, 'rows per step, over all devices')
  eval_batch_size: int = setting(64, 'rows per evaluation batch')
  num_steps: int = setting(2_700, 'optimizer steps in all')
  learning_rate: float = setting(3e-3, 'peak learning rate of AdamW')
  warmup_steps: int = setting(300, 'linear warm-up, then cosine decay to 1%')
  weight_decay: float = setting(0.05, 'AdamW weight decay (not on biases, norms)')
  clip_norm: float = setting(1.0, 'gradients are clipped to this global norm')
  model_axis: int = setting(
    1, "devices on the 'model' mesh axis (heads, MLP units); the rest is data"
  )

  # Outputs.
  workdir: str = setting('runs/listops', 'outputs, checkpoints; rerun to resume')
  eval_every: int = setting(500, 'steps between validations')
  checkpoint_every: int = setting(500, 'steps between checkpoints')
  keep_checkpoints: int = setting(3, 'newest checkpoints kept')
  log_every: int = setting(20, 'steps per logged training record')
  progress: bool = setting(True, 'show a progress bar (--no-progress: none)')


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
    pack=False,
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


def describe(field: dataclasses.Field) -> str:
  """The ``--help`` line of a field: what it does, allowed values, default."""
  choices = field.metadata.get('choices')
  allowed = f'; one of {", ".join(choices)}' if choices else ''
  return f'{field.metadata["help"]}{allowed} (default: {field.default!r})'


def validate(config: Config) -> None:
  """Raises UserError naming the flag for settings that cannot work."""
  for field in dataclasses.fields(config):
    choices = field.metadata.get('choices')
    value = getattr(config, field.name)
    if choices and value not in choices:
      raise UserError(f'--{field.name} must be one of {choices}; got {value!r}.')
  for name in (
    'batch_size',
    'eval_batch_size',
    'num_steps',
    'max_length',
    'bucket_width',
    'num_heads',
    'num_layers',
    'embed_dim',
    'mlp_dim',
    'log_every',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
  ):
    if getattr(config, name) < 1:
      raise UserError(f'--{name} must be positive; got {getattr(config, name)}.')
  if config.embed_dim % config.num_heads:
    raise UserError(
      f'--embed_dim {config.embed_dim} must be a multiple of --num_heads '
      f'{config.num_heads}.'
    )
  if config.pack and config.attention in ('xla', 'cudnn'):
    raise UserError(
      f'--attention {config.attention} takes no segment ids, which keep packed '
      'examples apart: add --no-pack.'
    )
  for name in ('dropout_rate', 'attention_dropout_rate'):
    if not 0.0 <= getattr(config, name) < 1.0:
      raise UserError(f'--{name} must lie in [0, 1); got {getattr(config, name)}.')
  if config.max_length < 2:
    raise UserError(
      f'--max_length must leave room for [CLS] and a token; got {config.max_length}.'
    )
