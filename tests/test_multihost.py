"""Multi-host: 2 local processes joined by jax.distributed (select: -m multihost)."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / 'examples' / 'multihost.py'

pytestmark = pytest.mark.multihost


def run(*args, timeout=150):
  return subprocess.run(
    [sys.executable, str(SCRIPT), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def test_two_processes_agree_with_single_device():
  done = run('--processes', '2', '--devices-per-process', '4', '--timeout', '110')
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'all 2 processes agree' in done.stdout


def test_taken_port_is_reported():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen()
    port = s.getsockname()[1]
    done = run('--port', str(port), timeout=60)
  assert done.returncode == 2
  assert f'127.0.0.1:{port} is taken' in done.stderr
