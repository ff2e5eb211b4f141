"""Network pieces that replace library ones compute the same values and gradients.

layers.Embed (nn.Embed, both paths), layers.xla_attention (the XLA path of
jax.nn.dot_product_attention), the transformer's Linear and MlpIn
(nn.DenseGeneral and the activation, on the CPU's path and on the other
backends'), layers.gated_unit (autodiff, with its GPU kernel run interpreted,
and lowered to Triton for CUDA)
and the transformer's rotary embedding (autodiff of the rotation).
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


def gated(activation, h):
  """The gated unit as autodiff sees it: activation(gate) * up of h [..., 2, F]."""
  return activation(h[..., 0, :]) * h[..., 1, :]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_linear_and_mlp_in_match_dense_general(backend, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)  # Picks the path; runs here.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4, 6))
  init = nn.initializers.normal(0.02)
  mlp_in = functools.partial(transformer.MlpIn, kernel_axes=("embed", None, "mlp"),
                             kernel_std=0.02, dtype=jnp.float32)
  cases = [  # (ours, nn.DenseGeneral, what follows it): kernels narrower and wider than x.
      (transformer.Linear((5,), ("heads", "head_dim", "embed"), 0.02, jnp.float32,
                          num_in_axes=2),
       nn.DenseGeneral(5, axis=(-2, -1), use_bias=False, kernel_init=init), lambda h: h),
      (transformer.Linear((3, 2, 7), ("embed", None, "heads", "head_dim"), 0.02, jnp.float32),
       nn.DenseGeneral((3, 2, 7), use_bias=False, kernel_init=init), lambda h: h),
      (mlp_in(features=(2, 9), mlp_type="swiglu"),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init),
       functools.partial(gated, nn.silu)),
      (mlp_in(features=(2, 9), mlp_type="geglu"),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init),
       functools.partial(gated, nn.gelu)),
      (mlp_in(features=(1, 9), mlp_type="gelu"),
       nn.DenseGeneral((1, 9), use_bias=False, kernel_init=init),
       lambda h: nn.gelu(h[..., 0, :])),
  ]
  for ours, reference, after_reference in cases:
    params = reference.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(ours.init(jax.random.PRNGKey(1), x))) == (
        jax.tree.map(jnp.shape, params))
    apply_reference = lambda params, x: after_reference(reference.apply(params, x))  # pylint: disable=cell-var-from-loop
    out_shape = jax.eval_shape(apply_reference, params, x).shape
    weights = jax.random.normal(jax.random.PRNGKey(2), out_shape)

    def loss(apply, params, x):
      return jnp.sum(apply(params, x) * weights)  # pylint: disable=cell-var-from-loop

    value_and_grad = lambda apply: jax.value_and_grad(  # pylint: disable=cell-var-from-loop
        functools.partial(loss, apply), (0, 1))(params, x)
    for value, expected in zip(jax.tree.leaves(value_and_grad(ours.apply)),
                               jax.tree.leaves(value_and_grad(apply_reference))):
      np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", [nn.silu, nn.gelu])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_unit_matches_autodiff(activation, dtype, monkeypatch):
  # On a GPU, silu's gradient at h [32 tokens, 2, 512] is the Pallas kernel: interpreted here.
  kernel_calls = []

  def interpreted_kernel(h, g):
    kernel_calls.append(h.shape)
    return swiglu_grad_pallas(h, g, interpret=True)

  swiglu_grad_pallas = layers.swiglu_grad_pallas
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(layers, "swiglu_grad_pallas", interpreted_kernel)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 2, 512)).astype(dtype)
  # Exact in dtype, so that both sides see the same output gradient.
  weights = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 512)).astype(dtype).astype(
      jnp.float32)

  def grad(unit, h):
    return jax.grad(lambda h: jnp.sum(unit(h).astype(jnp.float32) * weights))(h)

  ours = grad(functools.partial(layers.gated_unit, activation=activation), h)
  # In float32 from the same inputs, then rounded to dtype once, as ours is.
  reference = grad(functools.partial(gated, activation), h.astype(jnp.float32)).astype(dtype)
  assert len(kernel_calls) == (activation is nn.silu)
  assert ours.dtype == dtype
  tolerance = 1e-6 if dtype == jnp.float32 else 2.0**-7  # bf16: one rounding apart at most
  np.testing.assert_allclose(ours.astype(jnp.float32), reference.astype(jnp.float32),
                             rtol=tolerance, atol=1e-6)


def test_swiglu_kernel_matches_xla_gradient():
  h = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2, 768))
  g = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 768))
  np.testing.assert_allclose(layers.swiglu_grad_pallas(h, g, interpret=True),
                             layers._gated_unit_grad(h, g, nn.silu), rtol=1e-6, atol=1e-6)  # pylint: disable=protected-access


def test_swiglu_kernel_lowers_to_triton_for_cuda():
  # Lowered for CUDA without a GPU: Pallas's Triton lowering runs, and the kernel must use it.
  h = jax.ShapeDtypeStruct((1024, 2, 3072), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1024, 3072), jnp.bfloat16)
  triton = "__gpu$xla.gpu.triton"
  exported = jax.export.export(
      jax.jit(layers.swiglu_grad_pallas), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(h, g)
  assert triton in exported.mlir_module()


def test_rotary_rotates_pairs_and_its_gradient_rotates_back():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 300, 3, 16))
  weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  out = transformer.rotary(x)
  half = x.shape[-1] // 2
  # Position 0 is not rotated; every pair (i, i + D/2) keeps its length.
  np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(jnp.hypot(out[..., :half], out[..., half:]),
                             jnp.hypot(x[..., :half], x[..., half:]), rtol=1e-5)
  cos, sin = transformer._rotary_angles(x.shape[1], x.shape[-1])  # pylint: disable=protected-access
  grad = jax.grad(lambda x: jnp.sum(transformer.rotary(x) * weights))(x)
  expected = jax.grad(lambda x: jnp.sum(transformer._rotate(x, cos, sin) * weights))(x)  # pylint: disable=protected-access
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
