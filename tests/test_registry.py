"""Which kernel takes a call: the automatic policy per backend, and the
global batch and head indices every kernel's head function is given."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jattn import _prepare, _registry, _ring, _splash, _xla, sharding
from jattn._heads import map_heads
from tests import helpers


def prepared(dtype, backend, **options):
  q, k, v = (x.astype(dtype) for x in helpers.qkv(0, q_len=16, kv_len=16))
  p = _prepare.prepare_arguments(query=q, key=k, value=v, **options)
  return p._replace(backend=backend)


@pytest.fixture
def hopper(monkeypatch):
  """A GPU of compute capability 9.0 for the cuDNN rules (none is here)."""
  monkeypatch.setattr(_xla, 'gpu_capability', lambda: (9, 0))


@pytest.mark.parametrize(
  'backend, dtype, options, expected',
  [
    ('gpu', jnp.bfloat16, {}, 'cudnn'),
    ('gpu', jnp.float16, dict(is_causal=True), 'cudnn'),
    ('gpu', jnp.float32, {}, 'flash'),  # cuDNN takes half precision only
    ('gpu', jnp.bfloat16, dict(attention_chunk_size=4), 'flash'),  # not its rule
    ('gpu', jnp.bfloat16, dict(local_window_size=(3, 0)), 'cudnn'),
    ('gpu', jnp.bfloat16, dict(local_window_size=(3, 2)), 'flash'),  # right: no
    ('gpu', jnp.bfloat16, dict(is_causal=True, local_window_size=(3, 2)), 'cudnn'),
    ('gpu', jnp.bfloat16, dict(mask=jnp.ones((16, 16), bool)), 'flash'),  # O(T·S)
    ('cpu', jnp.bfloat16, {}, 'flash'),
    ('tpu', jnp.bfloat16, {}, 'splash'),
    ('tpu', jnp.float32, dict(is_causal=True, q_offsets=jnp.array([1, 2])), 'splash'),
    ('tpu', jnp.float32, dict(mask=jnp.ones((16, 16), bool)), 'splash'),  # tiles
    ('tpu', jnp.float32, dict(bias=jnp.zeros((16, 16))), 'flash'),
    ('tpu', jnp.float32, dict(logits_soft_cap=3.0, sinks=jnp.zeros(4)), 'splash'),
    ('a future backend', jnp.float32, {}, 'flash'),
  ],
)
def test_automatic_choice_is_a_policy_per_backend(
  backend, dtype, options, expected, hopper
):
  assert _registry.select(prepared(dtype, backend, **options)).name == expected


def test_splash_builds_element_tiles_only_up_to_a_size(monkeypatch):
  # A dense mask needs the sequence's element tiles: past MAX_TILE_BYTES the
  # automatic choice leaves the call to flash; an explicit 'splash' takes it.
  p = prepared(jnp.float32, 'tpu', mask=jnp.ones((16, 16), bool))
  monkeypatch.setattr(_splash, 'MAX_TILE_BYTES', 128 * 128 - 1)
  assert _registry.select(p).name == 'flash'
  assert not _registry.KERNELS['splash'].supports(p)


@pytest.mark.parametrize('capability, most', [((8, 0), 128), ((9, 0), 256)])
def test_cudnn_head_dims_follow_the_gpu(capability, most, monkeypatch):
  monkeypatch.setattr(_xla, 'gpu_capability', lambda: capability)
  cudnn = _registry.KERNELS['cudnn']
  for head_dim in (most, most + 8, 60):
    q, k, v = helpers.qkv(0, q_len=4, kv_len=4, head_dim=head_dim, dtype=jnp.bfloat16)
    p = _prepare.prepare_arguments(query=q, key=k, value=v)._replace(backend='gpu')
    reasons = cudnn.supports(p)
    assert (not reasons) == (head_dim == most), (head_dim, reasons)
  # A bias with an odd length: its backward cannot run.
  q, k, v = helpers.qkv(0, q_len=5, kv_len=4, dtype=jnp.bfloat16)
  p = _prepare.prepare_arguments(query=q, key=k, value=v, bias=jnp.zeros((5, 4)))
  assert any('even' in r for r in cudnn.supports(p._replace(backend='gpu')))


def test_cudnn_gives_its_reasons_off_a_gpu():
  p = prepared(jnp.float32, 'cpu', q_offsets=jnp.array([1, 2]))
  reasons = _registry.KERNELS['cudnn'].supports(p)
  assert any("'cpu' backend" in r for r in reasons)
  assert any('float32' in r for r in reasons)
  assert 'q_offsets' in reasons
  with pytest.raises(ValueError, match="implementation='cudnn' cannot take"):
    _registry.select(
      p._replace(opts=dataclasses.replace(p.opts, implementation='cudnn'))
    )


def indices_seen(p):
  """``[B, T=1, H, 2]``: the (batch, head) index each head function gets."""

  def head(q, k, v, bias, vis, seed):
    return jnp.stack([vis.batch_index, vis.head_index])[None]

  out = map_heads(head, p.q, p.k, p.v, None, p.vis, None, out_axis=1)
  return out.reshape(out.shape[:2] + (-1, 2))


def test_head_functions_get_global_batch_and_head_indices_on_a_mesh():
  p = prepared(jnp.float32, 'cpu')  # B=2, H=4, K=2
  expected = np.stack(np.meshgrid(np.arange(2), np.arange(4), indexing='ij'), -1)
  np.testing.assert_array_equal(indices_seen(p)[:, 0], expected)
  mesh = sharding.make_mesh({'data': 2, 'model': 2, 'seq': 2})
  specs = _ring.visibility_specs(p.vis, 'data', 'model', 'seq')
  spec_bthd = P('data', None, 'model', None)
  sharded = jax.shard_map(
    lambda q, k, v, vis: indices_seen(p._replace(q=q, k=k, v=v, vis=vis)),
    mesh=mesh,
    in_specs=(spec_bthd, spec_bthd, spec_bthd, specs),
    out_specs=P('data', None, 'model', None),
    check_vma=False,
  )(p.q, p.k, p.v, p.vis)
  np.testing.assert_array_equal(sharded[:, 0], expected)
