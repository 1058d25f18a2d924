"""A strict JAX for every test (tests/ and the examples): 8 CPU devices, no
implicit rank or dtype promotion."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite is bound by XLA's compile time. LLVM -O2 instead of -O3 cuts it
# by a fifth, and XLA's older LLVM fusion emitters instead of its MLIR ones
# by another fifth: the same HLO and IEEE semantics (no fast-math either way);
# the example's training subprocesses keep XLA's defaults. A flag set in
# XLA_FLAGS beforehand wins.
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

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')
jax.config.update('jax_numpy_dtype_promotion', 'strict')


@pytest.fixture
def rng():
  return jax.random.key(0)


def pytest_report_header(config):
  return f'jax {jax.__version__}, devices: {len(jax.devices())}'
