"""Orbax checkpoints of the train state: the last few, and the best.

``workdir/checkpoints/<step>`` keeps the newest ``keep`` states;
``workdir/best/<step>`` keeps the one with the best validation accuracy.
Restoring falls back to an older checkpoint when the newest is damaged.
"""

from __future__ import annotations

import os
import sys

import orbax.checkpoint as ocp

from config import UserError


class Checkpoints:
  def __init__(self, workdir: str, keep: int):
    options = lambda n: ocp.CheckpointManagerOptions(
      max_to_keep=n, enable_async_checkpointing=False, create=True
    )
    self.latest = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options(keep)
    )
    self.best = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'best')), options=options(1)
    )

  def save(self, state, *, best: bool = False) -> None:
    """Saves ``state`` (a pytree with a ``step``) as latest, or as the best."""
    manager = self.best if best else self.latest
    step = int(state['step'])
    if step not in manager.all_steps():
      manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()

  def restore(self, target, *, best: bool = False):
    """The newest readable checkpoint shaped like ``target``, or None if none.

    A checkpoint that fails to load is reported on stderr and skipped. If every
    latest checkpoint fails, raises UserError rather than silently starting
    over; if the best one fails, returns None (the caller falls back).
    """
    manager = self.best if best else self.latest
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as error:  # any damage: missing or truncated files
        message = (
          str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        )
        print(
          f'warning: checkpoint {manager.directory}/{step} is damaged ({message}); '
          'trying the previous one.',
          file=sys.stderr,
        )
    if steps and not best:
      raise UserError(
        f'no checkpoint in {manager.directory} could be read; move it away to '
        'start over.'
      )
    return None

  def close(self) -> None:
    self.latest.close()
    self.best.close()
