"""Tests for the image backbones md4.networks.unet.UNet, md4.networks.uvit.UViT and md4.networks.dit.DiT."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import defaults
from md4.networks import dit
from md4.networks import layers
from md4.networks import unet
from md4.networks import uvit
from md4.runtime import sharding

VOCAB = 256
NUM_CLASSES = 3
BATCH, SIZE = 2, 8


def key(seed: int) -> jax.Array:
  """A PRNG key whose bits compile several times faster on CPU than threefry's."""
  return jax.random.key(seed, impl="unsafe_rbg")


@functools.cache
def make(kind: str, num_classes: int = NUM_CLASSES, **overrides) -> nn.Module:
  """A tiny backbone; one instance per configuration, so jit caches are shared."""
  if kind == "unet":
    kwargs = dict(unet_channels=8, unet_channel_mult=(1, 2), unet_num_res_blocks=1,
                  unet_attention_resolutions=(4,), num_heads=2, dropout_rate=0.1,
                  embed_dim=4, unet_norm_groups=4)
    return unet.UNet(num_classes=num_classes, **(kwargs | overrides))
  if kind == "uvit":
    kwargs = dict(unet_channels=8, unet_channel_mult=(1, 2), unet_num_res_blocks=1, width=16,
                  num_layers=1, num_heads=2, patch_size=2, dropout_rate=0.1,
                  embed_dim=4, cond_dim=8, unet_norm_groups=4)
    return uvit.UViT(num_classes=num_classes, **(kwargs | overrides))
  kwargs = dict(patch_size=2, width=16, num_layers=2, num_heads=2, dropout_rate=0.1,
                token_embed_dim=4, frequency_dim=16)
  return dit.DiT(num_classes=num_classes, **(kwargs | overrides))


@functools.cache
def jitted(kind: str, num_classes: int = NUM_CLASSES, **overrides):
  return jax.jit(make(kind, num_classes, **overrides).apply, static_argnames="train")


def inputs(seed: int = 0, size: int = SIZE):
  """Tokens z [B, H, W, 3] with about a third masked, t [B], labels [B]."""
  rng = np.random.default_rng(seed)
  z = rng.integers(0, VOCAB, (BATCH, size, size, 3))
  z = np.where(rng.random(z.shape) < 0.3, VOCAB, z)
  t = rng.random(BATCH)
  label = rng.integers(0, NUM_CLASSES, BATCH)
  return (jnp.asarray(z, jnp.int32), jnp.asarray(t, jnp.float32),
          jnp.asarray(label, jnp.int32))


def param_shapes(model: nn.Module):
  """Boxed parameter shapes (no compilation)."""
  z, t, label = inputs()
  return jax.eval_shape(model.init, jax.random.key(0), z, t,
                        label if model.num_classes else None)["params"]


@functools.cache
def init_params(kind: str):
  """The real (jitted) init of the conditional tiny model, unboxed."""
  z, t, label = inputs()
  variables = jax.jit(make(kind).init)(key(0), z, t, label)
  return nn.meta.unbox(variables["params"])


def random_params(model: nn.Module, seed: int = 1, scale: float = 0.1):
  """Every parameter N(0, scale^2) (no zero inits), drawn on the host."""
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(param_shapes(model)))
  rng = np.random.default_rng(seed)
  values = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  return {"params": jax.tree.unflatten(treedef, values)}


@pytest.fixture(scope="module", params=["dit", "unet", "uvit"])
def kind(request) -> str:
  return request.param


# For checks whose U-Net half costs an extra ~10 s of compilation on this CPU.
KINDS_UNET_SLOW = ["dit", pytest.param("unet", marks=pytest.mark.slow)]


def test_shape_dtype_and_zero_logits_at_init(kind):
  """Logits are float32 [B, H, W, 3, 256], exactly 0 at init (zero head)."""
  z, t, label = inputs()
  logits = jitted(kind)({"params": init_params(kind)}, z, t, label)
  assert logits.shape == (BATCH, SIZE, SIZE, 3, VOCAB)
  assert logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, 0.0)


def test_unconditional_shape_no_label_params_and_rejects_labels(kind):
  model = make(kind, num_classes=0)
  assert "label" not in param_shapes(model)["condition"]
  assert "label" in param_shapes(make(kind))["condition"]
  params = random_params(model)
  z, t, label = inputs()
  logits = jitted(kind, num_classes=0)(params, z, t)
  assert logits.shape == (BATCH, SIZE, SIZE, 3, VOCAB)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  with pytest.raises(ValueError, match="label"):
    model.apply(params, z, t, label)


def test_every_param_has_logical_axis_names(kind):
  """Each parameter names every axis, from the documented set, without repeats."""
  boxes = jax.tree.leaves(param_shapes(make(kind)),
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes
  for box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned), type(box)
    assert len(box.names) == len(box.value.shape), (box.names, box.value.shape)
    named = [n for n in box.names if n is not None]
    assert set(named) <= set(layers.AXIS_NAMES), box.names
    assert len(named) == len(set(named)), box.names
    assert box.value.dtype == jnp.float32


def test_init_and_apply_run_under_the_logical_axis_rules(kind):
  """The compiled steps trace the network under the mesh's rules (`traced_with_rules`): there
  each parameter's names must fit the shape its init draws (a kernel drawn flattened to 2-D,
  as nn.DenseGeneral draws it, with 3 names fails)."""
  config = defaults.get_config()
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  model, (z, t, label) = make(kind), inputs()
  init = sharding.traced_with_rules(config, mesh, lambda: model.init(key(0), z, t, label))
  params = nn.meta.unbox(jax.eval_shape(init))
  apply = sharding.traced_with_rules(config, mesh, lambda p: model.apply(p, z, t, label))
  assert jax.eval_shape(apply, params).shape == (BATCH, SIZE, SIZE, 3, VOCAB)


def test_label_none_equals_null_label(kind):
  params = random_params(make(kind))
  z, t, _ = inputs()
  null = jnp.full((BATCH,), NUM_CLASSES, jnp.int32)
  apply = jitted(kind)
  np.testing.assert_array_equal(apply(params, z, t, None), apply(params, z, t, null))


def test_output_depends_on_label_time_and_tokens(kind):
  params = random_params(make(kind))
  z, t, label = inputs()
  apply = jitted(kind)
  base = apply(params, z, t, label)
  other_label = apply(params, z, t, (label + 1) % NUM_CLASSES)
  other_time = apply(params, z, 1.0 - t, label)
  unmasked = apply(params, jnp.where(z == VOCAB, 0, z), t, label)
  for other in (other_label, other_time, unmasked):
    assert float(jnp.max(jnp.abs(other - base))) > 1e-3


def cross_entropy(model, params, z, t, label, targets):
  logits = model.apply({"params": params}, z, t, label)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))


def test_gradients_reach_every_param(kind):
  """After 3 SGD steps from the real init every parameter has a finite, nonzero
  gradient: the zero inits (heads, gates, last convs) must not block each other."""
  model = make(kind)
  params = init_params(kind)
  z, t, label = inputs()
  targets = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, z.shape), jnp.int32)
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p: cross_entropy(model, p, z, t, label, targets)))
  loss, grads = grad_fn(params)
  np.testing.assert_allclose(loss, np.log(VOCAB), rtol=1e-6)  # uniform at init
  for _ in range(3):
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    loss, grads = grad_fn(params)
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert float(jnp.max(jnp.abs(g))) > 0.0, name


@pytest.mark.parametrize("kind", KINDS_UNET_SLOW)
def test_jit_matches_eager(kind):
  params = random_params(make(kind))
  z, t, label = inputs()
  eager = make(kind).apply(params, z, t, label)
  np.testing.assert_allclose(jitted(kind)(params, z, t, label), eager,
                             rtol=1e-5, atol=1e-5)


def test_dropout_in_train_mode(kind):
  """train=True draws from the "dropout" rng: same key, same output; another key
  or eval mode, a different output."""
  params = random_params(make(kind))
  z, t, label = inputs()

  def train(seed):
    return jitted(kind)(params, z, t, label, train=True, rngs={"dropout": key(seed)})

  eval_out = jitted(kind)(params, z, t, label)
  np.testing.assert_array_equal(train(0), train(0))
  assert float(jnp.max(jnp.abs(train(0) - train(1)))) > 1e-3
  assert float(jnp.max(jnp.abs(train(0) - eval_out))) > 1e-3


@pytest.mark.parametrize("kind", KINDS_UNET_SLOW)
def test_train_mode_without_dropout_equals_eval(kind):
  params = random_params(make(kind))
  z, t, label = inputs()
  train_out = jitted(kind, dropout_rate=0.0)(params, z, t, label, train=True,
                                        rngs={"dropout": key(0)})
  np.testing.assert_allclose(train_out, jitted(kind)(params, z, t, label),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS_UNET_SLOW)
def test_bfloat16_compute(kind):
  """dtype=bfloat16 keeps float32 params and logits, close to the float32 net."""
  params = random_params(make(kind))
  z, t, label = inputs()
  reference = jitted(kind)(params, z, t, label)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(
      nn.meta.unbox(param_shapes(make(kind, dtype=jnp.bfloat16)))))
  logits = jitted(kind, dtype=jnp.bfloat16)(params, z, t, label)
  assert logits.dtype == jnp.float32
  scale = float(jnp.std(reference))
  assert float(jnp.max(jnp.abs(logits - reference))) < 0.2 * scale


def test_bad_inputs_raise(kind):
  model = make(kind)
  params = random_params(model)
  z, t, label = inputs()
  cases = [
      ("z", (z.astype(jnp.float32), t, label)),
      ("z", (z[0], t, label)),
      ("z", (z.at[0, 0, 0, 0].set(VOCAB + 1), t, label)),
      ("z", (z.at[0, 0, 0, 0].set(-1), t, label)),
      ("t", (z, t[:1], label)),
      ("label", (z, t, label.astype(jnp.float32))),
      ("label", (z, t, label.at[0].set(NUM_CLASSES + 1))),
      ("label", (z, t, label[:1])),
  ]
  for name, args in cases:
    with pytest.raises(ValueError, match=name):
      model.apply(params, *args)


def test_dit_patch_layout():
  """With no blocks, a pixel's logits see only its own p x p patch: changing one
  token changes exactly the logits of the pixels in that patch."""
  params = random_params(make("dit", num_layers=0))
  z, t, label = inputs()
  apply = jitted("dit", num_layers=0)
  base = apply(params, z, t, label)
  changed = apply(params, z.at[:, 5, 2, 1].set((z[:, 5, 2, 1] + 1) % VOCAB),
                  t, label)
  moved = np.asarray(jnp.max(jnp.abs(changed - base), axis=(0, 3, 4)) > 0)
  expected = np.zeros((SIZE, SIZE), bool)
  expected[4:6, 2:4] = True
  np.testing.assert_array_equal(moved, expected)


def test_dit_rejects_indivisible_image():
  with pytest.raises(ValueError, match="patch_size"):
    param_shapes(make("dit", patch_size=3))


def test_unet_size_checks():
  with pytest.raises(ValueError, match="norm_groups"):
    param_shapes(make("unet", unet_norm_groups=3))
  z, t, label = inputs(size=6)
  model = make("unet", unet_channel_mult=(1, 1, 1))
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(model.init, jax.random.key(0), z, t, label)


def test_unet_without_downsampling():
  """unet_channel_mult=(1,) (MD4's CIFAR-10 layout) keeps the full resolution."""
  overrides = dict(unet_channel_mult=(1,), unet_num_res_blocks=2,
                   unet_attention_resolutions=())
  names = param_shapes(make("unet", **overrides))
  assert not any("resample" in name for name in names)
  assert sum(name.startswith("up_0_res") for name in names) == 3
  z, t, label = inputs()
  logits = jitted("unet", **overrides)(random_params(make("unet", **overrides)),
                                       z, t, label)
  assert logits.shape == (BATCH, SIZE, SIZE, 3, VOCAB)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_uvit_levels_and_learned_positions():
  """Two levels: a resampling res block each way, a DiT over the 4x4 level's 2x2 patches
  whose position embedding is a parameter starting at the 2D sin-cos table."""
  names = {jax.tree_util.keystr(path, simple=True, separator="/")
           for path, _ in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(
               param_shapes(make("uvit"))))}
  assert {"down_0_resample/conv_in/kernel", "up_1_resample/conv_in/kernel",
          "middle/pos_embed", "middle/block_0/attention/out/kernel"} <= names
  assert "middle/block_0/attention/out/bias" not in names
  assert not any("norm/scale" in name or "norm/bias" in name for name in names)
  np.testing.assert_array_equal(init_params("uvit")["middle"]["pos_embed"],
                                dit.sincos_position_embedding(2, 2, 16))


def test_sincos_position_embedding_distinct_rows():
  emb = dit.sincos_position_embedding(3, 5, 16)
  assert emb.shape == (15, 16)
  distances = np.linalg.norm(emb[:, None] - emb[None, :], axis=-1)
  assert np.all(distances[~np.eye(15, dtype=bool)] > 1e-3)
  with pytest.raises(ValueError, match="width"):
    dit.sincos_position_embedding(2, 2, 6)
