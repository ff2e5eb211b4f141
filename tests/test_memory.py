"""What keeps a step's memory down: the chunked loss, remat policies, scanned layers, shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import defaults
from md4 import diffusion
from md4 import models
from md4 import schedule


def _model(seq_len: int = 32, config_options: dict | None = None,
           **model_options) -> tuple[models.Model, dict]:
  config = defaults.get_config()
  config.seq_len = seq_len
  config.update_from_flattened_dict(config_options or {})
  config.model.update(model_options)
  model = models.create(config, 27, (seq_len,))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
  # The output layer starts at zero; perturbed, the logits (and gradients) are not uniform.
  noise = jax.random.PRNGKey(1)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(noise, p.shape), params)
  return model, params


def _loss_and_grads(model: models.Model, params: dict, loss_chunk_size: int = 0):
  model.config.loss_chunk_size = loss_chunk_size
  x = jax.random.randint(jax.random.PRNGKey(2), (4, model.example_shape[0]), 0, 27)
  objective = lambda p: model.loss(p, {"x": x}, jax.random.PRNGKey(3), True).objective.mean()
  return jax.value_and_grad(objective)(params)


def _assert_close(tree_a, tree_b, rtol=1e-5, atol=1e-6):
  for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_chunked_map_and_its_gradient_equal_the_whole_one():
  features = jax.random.normal(jax.random.PRNGKey(0), (3, 12, 5))
  weights = jax.random.normal(jax.random.PRNGKey(1), (5, 7))
  x = jax.random.randint(jax.random.PRNGKey(2), (3, 12), 0, 7)
  y = jax.random.normal(jax.random.PRNGKey(3), (3, 12, 2))

  def terms(logits, x, y):  # A pytree of per-position outputs of two inputs.
    return {"log_prob": diffusion.token_log_prob(logits, x), "scaled": logits[..., :2] * y}

  def total(outputs):
    return outputs["log_prob"].sum() + outputs["scaled"].sum()

  def whole(h, w):
    return total(terms(h @ w, x, y))

  def chunked(h, w):
    return total(diffusion.chunked_map(terms, h, lambda part: part @ w, (x, y), 4))

  _assert_close(jax.value_and_grad(whole, argnums=(0, 1))(features, weights),
                jax.value_and_grad(chunked, argnums=(0, 1))(features, weights))
  with pytest.raises(ValueError, match="must divide"):
    diffusion.chunked_map(terms, features, lambda part: part @ weights, (x, y), 5)


def test_factored_predict_fn_gives_the_plain_nelbo_and_gradient():
  model, params = _model()
  plain = _loss_and_grads(model, params)
  chunked = _loss_and_grads(model, params, loss_chunk_size=8)
  _assert_close(plain, chunked)
  predict = model.factored_predict_fn(params, None, False, None)
  z = jnp.full((2, 32), 27, jnp.int32)
  t = jnp.array([0.3, 0.7])
  np.testing.assert_allclose(predict(z, t), model.predict_fn(params)(z, t), rtol=1e-6)


def test_the_public_loss_takes_a_factored_predict_fn():
  weights = jax.random.normal(jax.random.PRNGKey(0), (28, 27))
  features = lambda z, t: jax.nn.one_hot(z, 28) * (1.0 + t[:, None, None])
  head = lambda h: h @ weights
  x = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 27)
  args = dict(schedule=schedule.get("linear"), vocab_size=27)
  plain, _ = diffusion.loss(lambda z, t: head(features(z, t)), x, jax.random.PRNGKey(2), **args)
  chunked, _ = diffusion.loss(diffusion.Factored(features, head, 4), x, jax.random.PRNGKey(2),
                              **args)
  np.testing.assert_allclose(plain, chunked, rtol=1e-6)


@pytest.mark.parametrize("options", [
    {"model_type": "genmd4"},
    {"model_type": "genmd4", "genmd4.single_sample": True},
    {"model_type": "prime"},
    {"model_type": "prime", "prime.objective": "joint"},
    {"model_type": "prime", "prime.binary": True},
])
def test_chunked_genmd4_and_prime_losses_equal_the_plain_ones(options):
  model, params = _model(config_options=options)
  assert isinstance(_factored(model, params), diffusion.Factored)
  _assert_close(_loss_and_grads(model, params), _loss_and_grads(model, params, loss_chunk_size=8))


def _factored(model: models.Model, params: dict):
  model.config.loss_chunk_size = 8
  return model.loss_predict_fn(params, {}, jax.random.PRNGKey(0), False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_keep_the_loss_and_gradient(policy):
  model, params = _model()
  rematerialised, _ = _model(remat_policy=policy)
  _assert_close(_loss_and_grads(model, params), _loss_and_grads(rematerialised, params))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "full"])
def test_scanned_layers_stack_the_blocks_and_train(policy):
  model, params = _model(scan_layers=True, remat_policy=policy)
  blocks = params["network"]["blocks"]
  assert all(leaf.shape[0] == model.config.model.num_layers for leaf in jax.tree.leaves(blocks))
  boxed = model.init(jax.random.PRNGKey(0))["network"]["blocks"]
  assert all(box.names[0] == "layers" for box in jax.tree.leaves(
      boxed, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned)))
  loss, grads = _loss_and_grads(model, params)
  assert np.isfinite(loss)
  assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("dataset", ["synthetic", "chars", "text8", "tokens"])
def test_text_sources_give_their_shapes_without_data(dataset, tmp_path):
  config = defaults.get_config()
  config.update(dataset=dataset, seq_len=48, data_dir=str(tmp_path))
  config.tokens.tokenizer = "tiktoken:gpt2"
  shapes = data_lib.shapes(config)
  assert shapes.example_shape == (48,) and shapes.num_classes == 0
  assert shapes.vocab_size == (50257 if dataset == "tokens" else 27)


def test_synthetic_shapes_match_the_dataset():
  config = defaults.get_config()
  dataset = data_lib.create(config)
  shapes = data_lib.shapes(config)
  assert (shapes.vocab_size, shapes.example_shape) == (dataset.vocab_size, dataset.example_shape)
