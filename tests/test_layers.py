"""Network pieces that replace library ones compute the same values and gradients.

layers.Embed (nn.Embed, both paths), layers.xla_attention (the XLA path of
jax.nn.dot_product_attention), and the transformer's Linear and MlpIn
(nn.DenseGeneral, on the CPU's path and on the other backends').
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import layers
from md4.networks import transformer


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_matches_jax_dot_product_attention(dtype):
  q, k, v, weights = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 40, 4, 16))

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * weights)

  inputs = [x.astype(dtype) for x in (q, k, v)]
  ours = jax.value_and_grad(functools.partial(loss, layers.xla_attention), (0, 1, 2))(*inputs)
  reference = jax.value_and_grad(  # In float32, from the same (rounded) inputs.
      functools.partial(loss, jax.nn.dot_product_attention), (0, 1, 2))(
          *[x.astype(jnp.float32) for x in inputs])
  assert [g.dtype for g in ours[1]] == [dtype] * 3
  tolerance = 1e-5 if dtype == jnp.float32 else 0.05  # bf16: a few roundings of 2^-8
  for value, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(value.astype(jnp.float32), expected, rtol=tolerance,
                               atol=tolerance * scale)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_linear_and_mlp_in_match_dense_general(backend, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)  # Picks the path; runs here.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4, 6))
  init = nn.initializers.normal(0.02)
  cases = [  # (ours, nn.DenseGeneral): kernels narrower and wider than their input.
      (transformer.Linear((5,), ("heads", "head_dim", "embed"), 0.02, jnp.float32,
                          num_in_axes=2),
       nn.DenseGeneral(5, axis=(-2, -1), use_bias=False, kernel_init=init)),
      (transformer.Linear((3, 2, 7), ("embed", None, "heads", "head_dim"), 0.02, jnp.float32),
       nn.DenseGeneral((3, 2, 7), use_bias=False, kernel_init=init)),
      (transformer.MlpIn((2, 9), ("embed", None, "mlp"), 0.02, jnp.float32),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init)),
  ]
  for ours, reference in cases:
    params = reference.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours.init(jax.random.PRNGKey(1), x))) == (
        jax.tree.map(jnp.shape, params))
    out_shape = jax.eval_shape(reference.apply, params, x).shape
    weights = jax.random.normal(jax.random.PRNGKey(2), out_shape)

    def loss(module, params, x):
      out = module.apply(params, x)
      out = jnp.stack(out, axis=-2) if isinstance(out, list) else out
      return jnp.sum(out * weights)

    value_and_grad = lambda module: jax.value_and_grad(  # pylint: disable=cell-var-from-loop
        functools.partial(loss, module), (0, 1))(params, x)
    for value, expected in zip(jax.tree.leaves(value_and_grad(ours)),
                               jax.tree.leaves(value_and_grad(reference))):
      np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
