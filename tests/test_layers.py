"""Network pieces that replace library ones compute the same values and gradients.

layers.Embed (nn.Embed, both paths) and layers.xla_attention (the XLA path of
jax.nn.dot_product_attention).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import layers


@pytest.mark.parametrize("num_embeddings", [27, layers.ONE_HOT_MAX_IDS + 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_matches_flax_embed(num_embeddings, dtype):
  init = nn.initializers.normal(1.0)
  ids = jax.random.randint(jax.random.PRNGKey(0), (4, 33), 0, num_embeddings)
  ours = layers.Embed(num_embeddings, 16, embedding_init=init, dtype=dtype)
  flax_embed = nn.Embed(num_embeddings, 16, embedding_init=init, dtype=dtype)
  params = ours.init(jax.random.PRNGKey(1), ids)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, flax_embed.init(jax.random.PRNGKey(1), ids))
  weights = jax.random.normal(jax.random.PRNGKey(2), (4, 33, 16))

  def loss(params):
    return jnp.sum(ours.apply(params, ids).astype(jnp.float32) * weights)

  grad = jax.grad(loss)(params)["params"]["embedding"]
  np.testing.assert_array_equal(ours.apply(params, ids), flax_embed.apply(params, ids))
  assert ours.apply(params, ids).dtype == dtype
  # The exact gradient: each row sums the output cotangents (rounded to dtype) of its ids.
  cotangent = weights.astype(dtype).astype(jnp.float32)
  exact = jnp.zeros((num_embeddings, 16)).at[ids].add(cotangent)
  tolerance = 1e-6 if dtype == jnp.float32 else 2.0**-8  # one rounding to bf16
  np.testing.assert_allclose(grad, exact, rtol=tolerance, atol=1e-6)


def test_attention_matches_jax_dot_product_attention():
  q, k, v, weights = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 40, 4, 16))

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v) * weights)

  ours = jax.value_and_grad(functools.partial(loss, layers.xla_attention), (0, 1, 2))(q, k, v)
  reference = jax.value_and_grad(
      functools.partial(loss, jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)
  for value, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
