"""Train a Transformer text classifier on jattn attention, or predict with one.

  python examples/text_classification/main.py                 # ListOps, ~10 min on CPU
  python examples/text_classification/main.py --preset lra_listops
  python examples/text_classification/main.py --train_file data.csv --workdir runs/mine
  python examples/text_classification/main.py --predict "[MAX 2 9 [MIN 4 7 ] 0 ]"

Rerunning a command resumes from its --workdir (a finished run is left as
it is). Every flag below is a field of config.Config, described there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import config as config_lib


def parse(argv=None) -> tuple[config_lib.Config, list[str]]:
  """(config, texts to predict) from the command line."""
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--preset',
    choices=sorted(config_lib.PRESETS),
    default='default',
    help='a set of defaults (see config.py); flags given beside it win',
  )
  parser.add_argument(
    '--predict',
    action='append',
    metavar='TEXT',
    help='print the predicted label of TEXT with the model in --workdir (repeatable)',
  )
  for field in dataclasses.fields(config_lib.Config):
    # default=None marks "not given", so a preset's value is kept.
    help = config_lib.describe(field).replace('%', '%%')  # argparse formats help
    if field.type == 'bool':
      parser.add_argument(
        f'--{field.name}',
        action=argparse.BooleanOptionalAction,
        default=None,
        help=help,
      )
    else:
      kind = {'int': int, 'float': float, 'str': str}[field.type]
      choices = field.metadata['choices']
      parser.add_argument(
        f'--{field.name}',
        type=kind,
        default=None,
        metavar='{' + ','.join(choices) + '}' if choices else field.type.upper(),
        help=help,
      )
  args = parser.parse_args(argv)
  values = dict(config_lib.PRESETS[args.preset])
  values.update(
    {
      f.name: getattr(args, f.name)
      for f in dataclasses.fields(config_lib.Config)
      if getattr(args, f.name) is not None
    }
  )
  return config_lib.Config(**values), args.predict or []


def main(argv=None) -> None:
  """Runs the command line; a user error is one line on stderr and status 2."""
  try:
    run(*parse(argv))
  except config_lib.UserError as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None


def run(config: config_lib.Config, texts: list[str]) -> None:
  if texts:
    import predict

    predict.print_predictions(config.workdir, texts)
    return
  import train

  summary = train.train_and_evaluate(config)
  print(
    f'\nbest validation accuracy {summary["best_validation_accuracy"] or 0:.4f} (step '
    f'{summary["best_step"]}); test accuracy {summary["test_accuracy"]:.4f} '
    f'(majority class {summary["majority_class_test_accuracy"]:.4f}); '
    f'{summary["wall_seconds"]:.0f} s wall over {summary["train_tokens"]} '
    f'training tokens ({summary["train_tokens_per_second"] or 0:.0f} tokens/s).\n'
    f'Outputs in {config.workdir}: metrics.jsonl, summary.json, curves.png, '
    'attention.png, checkpoints/ (the latest and the best), vocab.json, labels.json.'
  )


if __name__ == '__main__':
  main()
