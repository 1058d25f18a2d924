"""Orbax checkpoints of the train state in ``workdir/checkpoints/<step>``.

One ``CheckpointManager`` keeps the newest ``keep`` states and, by orbax's
own preservation policies, the state with the best validation accuracy
(states saved at a validation carry it as their metrics). A damaged
checkpoint is reported and set aside as ``<step>.damaged``; restoring then
falls back to the one before.
"""

from __future__ import annotations

import json
import os
import sys

import orbax.checkpoint as ocp

from config import UserError

policies = ocp.checkpoint_managers


class Checkpoints:
  def __init__(self, workdir: str, keep: int):
    accuracy = lambda metrics: metrics['accuracy']
    options = ocp.CheckpointManagerOptions(
      best_fn=accuracy,  # for best_step()
      best_mode='max',
      preservation_policy=policies.AnyPreservationPolicy(
        [
          policies.LatestN(n=keep),
          policies.BestN(
            get_metric_fn=accuracy, n=1, keep_checkpoints_without_metrics=False
          ),
        ]
      ),
      enable_async_checkpointing=False,
      create=True,
    )
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._set_aside_unreadable_metrics()  # orbax cannot open a directory with one
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, state, *, accuracy: float | None = None) -> None:
    """Saves ``state`` (a pytree with a ``step``), with its validation
    ``accuracy`` when it has one; a step already saved is left as it is."""
    step = int(state['step'])
    if step not in self.manager.all_steps():
      metrics = None if accuracy is None else {'accuracy': accuracy}
      self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, target):
    """The newest readable checkpoint shaped like ``target``, or None if none.

    A checkpoint that fails to load is reported and set aside (the run
    redoes its steps from the one before). If none can be read, raises
    UserError rather than silently starting over.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      restored = self._restore(step, target)
      if restored is not None:
        return restored
      self._set_aside(step)
      self.manager.reload()
    if steps:
      raise UserError(
        f'no checkpoint in {self.directory} could be read; move it away to start over.'
      )
    return None

  def restore_best(self, target):
    """The checkpoint with the best validation accuracy, or None if there is
    none or it cannot be read (reported on stderr)."""
    step = self.manager.best_step()
    return None if step is None else self._restore(step, target)

  def _restore(self, step: int, target):
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # any damage: missing or truncated files
      message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
      self._report(step, message)
      return None

  def _report(self, step: int, message: str) -> None:
    print(
      f'warning: checkpoint {self.directory}/{step} is damaged ({message}).',
      file=sys.stderr,
    )

  def _set_aside(self, step: int) -> None:
    """Renames a damaged ``<step>`` to ``<step>.damaged`` (or ``.damaged2``, ...)."""
    path = os.path.join(self.directory, str(step))
    target, copies = f'{path}.damaged', 1
    while os.path.exists(target):
      copies += 1
      target = f'{path}.damaged{copies}'
    os.rename(path, target)

  def _set_aside_unreadable_metrics(self) -> None:
    if not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      metrics = os.path.join(self.directory, name, 'metrics', 'metrics')
      if name.isdigit() and os.path.exists(metrics):
        try:
          with open(metrics) as file:
            json.load(file)
        except ValueError:
          self._report(int(name), 'its metrics are not JSON')
          self._set_aside(int(name))

  def close(self) -> None:
    self.manager.close()
