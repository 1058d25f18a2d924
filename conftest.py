"""A strict JAX for every test (tests/ and the examples): 8 CPU devices, no
implicit rank or dtype promotion."""

import gc
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite is bound by compile time. On tests/test_flash.py's feature tests
# (one 2-core Xeon): XLA's defaults 71 s; LLVM -O2 instead of -O3 47 s; with
# XLA's older LLVM fusion emitters instead of its MLIR ones as well 39 s; with
# the collector setting below 36 s. The same HLO and IEEE semantics (no
# fast-math either way); the example's training subprocesses keep XLA's
# defaults. A flag set in XLA_FLAGS beforehand wins.
os.environ['XLA_FLAGS'] = ' '.join(
  [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
  + [
    flag
    for flag in (
      '--xla_backend_optimization_level=2',
      '--xla_cpu_use_fusion_emitters=false',
    )
    if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', '')
  ]
)

import jax
import pytest

# Tracing makes many short-lived objects: Python's collector, run every 700
# allocations by default, cost a tenth of the time (above).
gc.set_threshold(200_000, 20, 20)

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')


@pytest.fixture
def rng():
  return jax.random.key(0)


def pytest_report_header(config):
  return f'jax {jax.__version__}, devices: {len(jax.devices())}'
