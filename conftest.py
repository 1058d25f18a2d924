"""A strict JAX for every test (tests/ and the examples): 8 CPU devices, no
implicit rank or dtype promotion."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# LLVM -O2 instead of XLA's -O3: the suite is bound by compile time, which
# this cuts by a fifth (same IEEE semantics; no fast-math either way).
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_force_host_platform_device_count=8'
  + (
    ''
    if 'optimization_level' in os.environ.get('XLA_FLAGS', '')
    else ' --xla_backend_optimization_level=2'
  )
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
