"""Network pieces that replace library ones compute the same values and gradients.

layers.Embed (nn.Embed, both paths), kernels.xla_attention (the XLA path of
jax.nn.dot_product_attention), the transformer's Linear and MlpIn
(nn.DenseGeneral and the activation, on the CPU's path and on the other
backends'), kernels.gated_unit (autodiff, with its GPU kernel run interpreted,
and lowered to Triton for CUDA), kernels.rotary (autodiff of the rotation),
and whole backbones with custom_kernels on and off; the input adapters
layers.SequenceEmbed and layers.SlotEmbed; the transformer's architecture
options (MLP width rounding, time_conditioning="none", channel dropout).
"""

import functools

import flax.linen as nn
import jax
from jax import export  # A submodule JAX 0.7 does not import with jax.
import jax.numpy as jnp
import numpy as np
import pytest

from md4.networks import dit
from md4.networks import kernels
from md4.networks import layers
from md4.networks import transformer
from md4.networks import unet


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
  ours = jax.value_and_grad(functools.partial(loss, kernels.xla_attention), (0, 1, 2))(*inputs)
  reference = jax.value_and_grad(  # In float32, from the same (rounded) inputs.
      functools.partial(loss, jax.nn.dot_product_attention), (0, 1, 2))(
          *[x.astype(jnp.float32) for x in inputs])
  assert [g.dtype for g in ours[1]] == [dtype] * 3
  tolerance = 1e-5 if dtype == jnp.float32 else 0.05  # bf16: a few roundings of 2^-8
  for value, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(value.astype(jnp.float32), expected, rtol=tolerance,
                               atol=tolerance * scale)


def boxed_shapes(module: nn.Module, *args) -> dict:
  """{parameter path: (shape, logical axis names)} of module.init(*args), without compiling."""
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  boxes = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          (box.value.shape, box.names) if isinstance(box, nn.LogicallyPartitioned) else
          (box.shape, None) for path, box in boxes}


def test_sequence_embed_is_one_table():
  ids = jnp.arange(2 * 7, dtype=jnp.int32).reshape(2, 7) % 28
  embed = layers.SequenceEmbed(28, 12, dtype=jnp.bfloat16)
  assert boxed_shapes(embed, ids) == {"embedding": ((28, 12), ("vocab", "embed"))}
  params = embed.init(jax.random.PRNGKey(0), ids)
  out = embed.apply(params, ids)
  assert out.shape == (2, 7, 12) and out.dtype == jnp.bfloat16
  table = nn.meta.unbox(params)["params"]["embedding"]
  np.testing.assert_array_equal(out, table[ids].astype(jnp.bfloat16))


def test_sequence_embed_projects_a_narrower_table():
  ids = jnp.arange(2 * 7, dtype=jnp.int32).reshape(2, 7) % 28
  embed = layers.SequenceEmbed(28, 12, table_dim=4)
  assert boxed_shapes(embed, ids) == {"embedding": ((28, 4), ("vocab", "embed")),
                                      "project/kernel": ((4, 12), (None, "embed")),
                                      "project/bias": ((12,), ("embed",))}
  params = nn.meta.unbox(embed.init(jax.random.PRNGKey(0), ids))
  tables = params["params"]
  expected = tables["embedding"][ids] @ tables["project"]["kernel"] + tables["project"]["bias"]
  np.testing.assert_allclose(embed.apply(params, ids), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_slots, projected", [(2, False), (3, True), (1, False)])
def test_slot_embed_concatenates_one_table_per_slot(num_slots, projected):
  width = 10
  slot_width = -(-width // num_slots)
  ids = jnp.arange(2 * 7 * num_slots, dtype=jnp.int32).reshape(2, 7, num_slots) % 5
  embed = layers.SlotEmbed(5, num_slots, width)
  expected = {f"slot{j}/embedding": ((5, slot_width), ("vocab", "embed"))
              for j in range(num_slots)}
  if projected:
    expected["project/kernel"] = ((num_slots * slot_width, width), ("embed", None))
  assert boxed_shapes(embed, ids) == expected
  params = embed.init(jax.random.PRNGKey(0), ids)
  out = embed.apply(params, ids)
  assert out.shape == (2, 7, width)
  tables = nn.meta.unbox(params)["params"]
  concatenated = jnp.concatenate(
      [tables[f"slot{j}"]["embedding"][ids[..., j]] for j in range(num_slots)], axis=-1)
  if projected:
    concatenated = concatenated @ tables["project"]["kernel"]
  np.testing.assert_allclose(out, concatenated, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="num_slots"):
    embed.apply(params, ids[..., :1] if num_slots > 1 else jnp.concatenate([ids, ids], -1))


def test_transformer_reads_its_input_through_embed():
  t = jnp.array([0.3, 0.8])
  make = functools.partial(transformer.Transformer, vocab_size=27, width=32, num_layers=1,
                           num_heads=4)
  ids = jnp.zeros((2, 7, 3), jnp.int32)
  shapes = boxed_shapes(make(embed=layers.SlotEmbed(5, 3, 32)), ids, t)
  assert {name for name in shapes if name.startswith("embed")} == {
      "embed/slot0/embedding", "embed/slot1/embedding", "embed/slot2/embedding",
      "embed/project/kernel"}
  with pytest.raises(ValueError, match="width"):
    boxed_shapes(make(embed=layers.SequenceEmbed(28, 16)), ids[..., 0], t)


def test_mlp_hidden_width_rounds_up():
  assert transformer.mlp_hidden_dim(768, 8 / 3, 32) == 2048  # MD4-S: 2/3 * 4 * 768.
  assert transformer.mlp_hidden_dim(1024, 8 / 3, 32) == 2752  # int(2730.7) -> 2752.
  assert transformer.mlp_hidden_dim(128, 4.0, 1) == 512
  make = functools.partial(transformer.Transformer, embed=layers.SequenceEmbed(28, 32),
                           vocab_size=27, width=32, num_layers=1, num_heads=4,
                           mlp_ratio=8 / 3, mlp_multiple_of=16)
  ids, t = jnp.zeros((2, 7), jnp.int32), jnp.zeros((2,))
  assert boxed_shapes(make(), ids, t)["block0/mlp_in/kernel"][0] == (32, 2, 96)
  with pytest.raises(ValueError, match="mlp_type"):
    boxed_shapes(make(mlp_type="relu"), ids, t)


def tiny_transformer(**overrides) -> nn.Module:
  kwargs = dict(embed=layers.SequenceEmbed(28, 32), vocab_size=27, width=32, num_layers=2,
                num_heads=4, cond_dim=8)
  return transformer.Transformer(**(kwargs | overrides))


def random_params(shapes, seed: int = 0, scale: float = 0.1):
  """Parameters of these shapes drawn N(0, scale^2): no zero-initialised head hides a difference."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(shapes))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def test_time_conditioning_none_ignores_t_with_the_same_parameters():
  ids = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 28
  t = jnp.array([0.3, 0.8])
  with_time, without_time = tiny_transformer(), tiny_transformer(time_conditioning="none")
  shapes = jax.eval_shape(with_time.init, jax.random.PRNGKey(0), ids, t)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
      jnp.shape, jax.eval_shape(without_time.init, jax.random.PRNGKey(0), ids, t))
  params = random_params(shapes)
  out = without_time.apply(params, ids, t)
  np.testing.assert_array_equal(out, without_time.apply(params, ids, 1.0 - t))
  # It is the time-conditioned network read at t = 0.
  np.testing.assert_allclose(out, with_time.apply(params, ids, jnp.zeros(2)), rtol=1e-6,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(with_time.apply(params, ids, t) - out))) > 1e-3


@pytest.mark.parametrize("channel_dropout", [True, False])
def test_channel_dropout_drops_a_feature_for_the_whole_sequence(channel_dropout):
  block = transformer.Block(num_heads=2, mlp_dim=16, mlp_type="swiglu", dropout_rate=0.5,
                            channel_dropout=channel_dropout, kernel_init="md4", num_layers=1,
                            attention_impl="xla", custom_kernels=False, dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 8))
  cond = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  params = random_params(jax.eval_shape(lambda rng: block.init(rng, x, cond, False),
                                        jax.random.PRNGKey(2)))
  _, state = block.apply(params, x, cond, True, rngs={"dropout": jax.random.PRNGKey(3)},
                         capture_intermediates=True)
  outputs = state["intermediates"]
  # The dropout's inputs are the attention's and the MLP's output projections.
  for name, dropped in zip(("attention_out", "mlp_out"), outputs["Dropout_0"]["__call__"]):
    kept = np.asarray(dropped != 0)
    assert np.all(np.asarray(outputs[name]["__call__"][0]) != 0)
    assert 0.2 < kept.mean() < 0.8
    same_over_positions = bool(np.all(kept == kept[:, :1]))
    assert same_over_positions == channel_dropout


def gated(activation, h):
  """The gated unit as autodiff sees it: activation(gate) * up of h [..., 2, F]."""
  return activation(h[..., 0, :]) * h[..., 1, :]


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_linear_and_mlp_in_match_dense_general(backend, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)  # Picks the path; runs here.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4, 6))
  init = nn.initializers.normal(0.02)
  mlp_in = functools.partial(transformer.MlpIn, kernel_axes=("embed", None, "mlp"),
                             kernel_init=init, dtype=jnp.float32, custom_kernels=True)
  cases = [  # (ours, nn.DenseGeneral, what follows it): kernels narrower and wider than x.
      (transformer.Linear((5,), ("heads", "head_dim", "embed"), init, jnp.float32, True,
                          num_in_axes=2),
       nn.DenseGeneral(5, axis=(-2, -1), use_bias=False, kernel_init=init), lambda h: h),
      (transformer.Linear((3, 2, 7), ("embed", None, "heads", "head_dim"), init, jnp.float32,
                          True),
       nn.DenseGeneral((3, 2, 7), use_bias=False, kernel_init=init), lambda h: h),
      (mlp_in(features=(2, 9), mlp_type="swiglu"),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init),
       functools.partial(gated, nn.silu)),
      (mlp_in(features=(2, 9), mlp_type="geglu"),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init),
       functools.partial(gated, nn.gelu)),
      (mlp_in(features=(2, 9), mlp_type="glu"),
       nn.DenseGeneral((2, 9), use_bias=False, kernel_init=init),
       functools.partial(gated, nn.sigmoid)),
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

  swiglu_grad_pallas = kernels.swiglu_grad_pallas
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kernels, "swiglu_grad_pallas", interpreted_kernel)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 2, 512)).astype(dtype)
  # Exact in dtype, so that both sides see the same output gradient.
  weights = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 512)).astype(dtype).astype(
      jnp.float32)

  def grad(unit, h):
    return jax.grad(lambda h: jnp.sum(unit(h).astype(jnp.float32) * weights))(h)

  ours = grad(functools.partial(kernels.gated_unit, activation=activation), h)
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
  np.testing.assert_allclose(kernels.swiglu_grad_pallas(h, g, interpret=True),
                             kernels._gated_unit_grad(h, g, nn.silu), rtol=1e-6, atol=1e-6)  # pylint: disable=protected-access


def test_swiglu_kernel_lowers_to_triton_for_cuda():
  # Lowered for CUDA without a GPU: Pallas's Triton lowering runs, and the kernel must use it.
  h = jax.ShapeDtypeStruct((1024, 2, 3072), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1024, 3072), jnp.bfloat16)
  triton = "__gpu$xla.gpu.triton"
  exported = export.export(
      jax.jit(kernels.swiglu_grad_pallas), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(h, g)
  assert triton in exported.mlir_module()


def test_rotary_rotates_pairs_and_its_gradient_rotates_back():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 300, 3, 16))
  weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  out = kernels.rotary(x)
  half = x.shape[-1] // 2
  # Position 0 is not rotated; every pair (i, i + D/2) keeps its length.
  np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(jnp.hypot(out[..., :half], out[..., half:]),
                             jnp.hypot(x[..., :half], x[..., half:]), rtol=1e-5)

  def grad(custom_kernels):
    return jax.grad(lambda x: jnp.sum(kernels.rotary(x, custom_kernels=custom_kernels)
                                      * weights))(x)

  np.testing.assert_allclose(grad(True), grad(False), rtol=1e-5, atol=1e-5)


BACKBONES = {  # Tiny backbones and their inputs: token ids z, times t [B].
    "transformer": (
        functools.partial(transformer.Transformer, embed=layers.SequenceEmbed(28, 32),
                          vocab_size=27, width=32, num_layers=2, num_heads=4),
        jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 28),
    "unet": (
        functools.partial(unet.UNet, unet_channels=8, unet_num_res_blocks=1, num_heads=2,
                          embed_dim=4, unet_norm_groups=4),
        jnp.arange(2 * 4 * 4 * 3, dtype=jnp.int32).reshape(2, 4, 4, 3) % 257),
    "dit": (
        functools.partial(dit.DiT, patch_size=2, width=16, num_layers=1, num_heads=2,
                          token_embed_dim=4, frequency_dim=16),
        jnp.arange(2 * 4 * 4 * 3, dtype=jnp.int32).reshape(2, 4, 4, 3) % 257),
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_custom_kernels_off_gives_the_same_values_and_gradients(backbone):
  make, z = BACKBONES[backbone]
  t = jnp.array([0.3, 0.8])
  shapes = nn.meta.unbox(jax.eval_shape(make().init, jax.random.PRNGKey(0), z, t))
  # Random parameters everywhere, so that no zero-initialised head hides a difference.
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(
      treedef, [jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
  out_shape = jax.eval_shape(make().apply, params, z, t).shape
  weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  def loss(custom_kernels, params):
    return jnp.sum(make(custom_kernels=custom_kernels).apply(params, z, t) * weights)

  # On CPU every backbone reaches a custom VJP with them on, and none with them off.
  assert "custom_vjp" in str(jax.make_jaxpr(functools.partial(loss, True))(params))
  assert "custom_vjp" not in str(jax.make_jaxpr(functools.partial(loss, False))(params))
  (value, grads), (expected_value, expected_grads) = (
      jax.jit(jax.value_and_grad(functools.partial(loss, custom_kernels)))(params)
      for custom_kernels in (True, False))
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  # Against the largest gradient: some parameters' gradients are 0 up to rounding.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads))
  for grad, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5 * scale)
