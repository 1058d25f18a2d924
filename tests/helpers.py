"""Random inputs for the tests, in the shape legend of DESIGN.md."""

import jax
import jax.numpy as jnp

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def qkv(
  seed=0,
  *,
  batch=(2,),
  q_len=6,
  kv_len=7,
  heads=4,
  kv_heads=2,
  head_dim=8,
  value_dim=None,
  dtype=jnp.float32,
):
  """query [B..., T, H, D], key [B..., S, K, D], value [B..., S, K, V]."""
  value_dim = head_dim if value_dim is None else value_dim
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  batch = tuple(batch)
  return (
    jax.random.normal(kq, batch + (q_len, heads, head_dim), dtype),
    jax.random.normal(kk, batch + (kv_len, kv_heads, head_dim), dtype),
    jax.random.normal(kv, batch + (kv_len, kv_heads, value_dim), dtype),
  )


def random_mask(seed, shape, p=0.7):
  return jax.random.bernoulli(jax.random.key(seed), p, shape)
