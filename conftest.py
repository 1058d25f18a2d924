"""A strict JAX for every test (tests/ and the examples): 8 CPU devices, no
implicit rank or dtype promotion."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# 8 devices; and LLVM's optimisations off for the CPU code XLA emits: the
# tests compile hundreds of small programs, and at level 0 compiling takes
# about 40% less time (the programs, their numerics and their buffers are
# XLA's, the same at any level; only the machine code is less tuned).
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
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
