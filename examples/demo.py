"""A one-minute tour of jattn: the pure function, the multi-head function, and
an nnx model that learns a task only attention can solve.

Task: each sequence holds random digits and one marker (token 10); the label
is the digit right after the marker. Run: ``python examples/demo.py``.
"""

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jattn
import jattn.nnx

VOCAB, LENGTH, MARKER, DIM, HEADS = 11, 16, 10, 64, 4


def make_batch(rng, size):
  digits_rng, where_rng = jax.random.split(rng)
  tokens = jax.random.randint(digits_rng, (size, LENGTH), 0, 10)
  where = jax.random.randint(where_rng, (size,), 0, LENGTH - 1)
  labels = tokens[jnp.arange(size), where + 1]
  tokens = tokens.at[jnp.arange(size), where].set(MARKER)
  return tokens, labels


class Classifier(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (LENGTH, DIM)))
    self.attention = nnx.List(
      [jattn.nnx.MultiHeadAttention(HEADS, DIM, rngs=rngs) for _ in range(2)]
    )
    self.norms = nnx.List([nnx.LayerNorm(DIM, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(DIM, 10, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.positions[...][None]
    for norm, layer in zip(self.norms, self.attention, strict=True):
      x = x + layer(norm(x))
    return self.head(x.mean(axis=1))


def main():
  q = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
  out = jattn.dot_product_attention(q, q, q, is_causal=True)
  print(f'dot_product_attention: {q.shape} -> {out.shape}')
  params = jattn.init_params(jax.random.key(1), in_features=32, num_heads=4)
  x = jax.random.normal(jax.random.key(2), (2, 16, 32))
  print(
    f'multi_head_attention: {x.shape} -> {jattn.multi_head_attention(params, x).shape}'
  )

  model = Classifier(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, labels):
    def loss_fn(model):
      logits = model(tokens)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits.argmax(-1) == labels).mean()

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy

  rng, start = jax.random.key(3), time.perf_counter()
  for step in range(1, 1501):
    rng, batch_rng = jax.random.split(rng)
    loss, accuracy = train_step(model, optimizer, *make_batch(batch_rng, 64))
    if step % 250 == 0:
      print(f'step {step:4d}  loss {float(loss):.3f}  accuracy {float(accuracy):.2f}')
  tokens, labels = make_batch(jax.random.key(99), 1000)
  test_accuracy = float((model(tokens).argmax(-1) == labels).mean())
  print(
    f'held-out accuracy {test_accuracy:.3f} (chance 0.10) '
    f'in {time.perf_counter() - start:.0f} s'
  )


if __name__ == '__main__':
  main()
