"""Ctrl-C and SIGTERM: stop at a checkpoint, never in the middle of one."""

from __future__ import annotations

import contextlib
import signal


class StopNow(Exception):
  """Raised where the run must end at once; ``signal`` is the signal's number."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signal = signum


class StopRequest:
  """SIGINT/SIGTERM set ``signal``; the training loop checkpoints and exits
  at the end of its logging window. A second signal, or the first once
  ``at_once`` is set (after training), raises ``StopNow``, except inside
  ``saving()``, which it lets finish first."""

  def __init__(self):
    self.signal = None
    self.at_once = False
    self._saving = self._pending = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    urgent = self.signal is not None or self.at_once
    self.signal = self.signal or signum
    if urgent and self._saving:
      self._pending = True
    elif urgent:
      raise StopNow(self.signal)

  @contextlib.contextmanager
  def saving(self):
    """A block no signal interrupts (a checkpoint being written)."""
    self._saving = True
    try:
      yield
    finally:
      self._saving = False
    if self._pending:
      raise StopNow(self.signal)
