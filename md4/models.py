"""Glue between a network and the diffusion math, one class per model_type.

A model owns its Flax network(s) and turns parameters into the `predict_fn`
that the pure loss and sampler functions take. Parameters are a dict
{"network": ...} (GenMD4 adds {"schedule": ...}).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from md4 import diffusion
from md4 import genmd4
from md4 import sampler
from md4 import schedule as schedule_lib
from md4.networks import learned_schedule
from md4.networks import transformer

Array = jnp.ndarray
Params = Any
Metrics = dict[str, Array]


def build_network(config: ml_collections.ConfigDict, num_inputs: int,
                  num_outputs: int, num_classes: int) -> nn.Module:
  """The backbone named by the config, reading num_inputs ids, emitting num_outputs logits."""
  model = config.model
  return transformer.Transformer(
      num_inputs=num_inputs, num_outputs=num_outputs, width=model.width,
      num_layers=model.num_layers, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
      mlp_type=model.mlp_type, time_conditioning=model.time_conditioning,
      num_classes=num_classes, dropout_rate=model.dropout_rate,
      attention_impl=model.attention_impl or None, remat_policy=model.remat_policy,
      scan_layers=model.scan_layers, dtype=jnp.dtype(model.dtype))


class MD4:
  """MD4: a fixed schedule, the continuous- or discrete-time NELBO, ancestral sampling."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               example_shape: tuple[int, ...], num_classes: int = 0):
    self.config = config
    self.vocab_size = vocab_size
    self.example_shape = tuple(example_shape)
    self.num_classes = num_classes
    self.schedule = schedule_lib.get(config.noise_schedule)
    self.network = build_network(config, vocab_size + 1, vocab_size, num_classes)

  def network_input(self, batch_size: int) -> Array:
    return jnp.zeros((batch_size, *self.example_shape), jnp.int32)

  def init(self, rng: Array) -> Params:
    """Boxed (logically partitioned) parameters {"network": ...}."""
    z = self.network_input(1)
    variables = self.network.init(rng, z, jnp.zeros((1,)), None)
    return {"network": variables["params"]}

  def predict_fn(self, params: Params, label: Array | None = None, train: bool = False,
                 rng: Array | None = None):
    """predict_fn(z, t) -> logits for the loss and sampler functions."""
    rngs = {"dropout": rng} if train else None

    def predict(z: Array, t: Array) -> Array:
      return self.network.apply({"params": params["network"]}, z, t, label, train=train,
                                rngs=rngs)

    return predict

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> tuple[Array, Metrics]:
    """(objective to minimise: NELBO nats per token, metrics with "nelbo" [B])."""
    rng_loss, rng_dropout = jax.random.split(rng)
    predict = self.predict_fn(params, batch.get("label"), train, rng_dropout)
    nelbo, aux = diffusion.loss(
        predict, batch["x"], rng_loss, schedule=self.schedule, vocab_size=self.vocab_size,
        cont_time=self.config.cont_time, timesteps=self.config.timesteps,
        antithetic=self.config.antithetic_time_sampling)
    num_tokens = math.prod(self.example_shape)
    return nelbo.mean() / num_tokens, {"nelbo": nelbo, **aux}

  def sample(self, params: Params, rng: Array, num_samples: int,
             label: Array | None = None) -> Array:
    """Samples int32 [N, *example_shape]."""
    return sampler.ancestral(
        self.predict_fn(params, label), rng, shape=(num_samples, *self.example_shape),
        vocab_size=self.vocab_size, schedule=self.schedule, steps=self.config.sample_steps,
        grid=self.config.sample_grid, top_p=self.config.sample_top_p)


class GenMD4(MD4):
  """GenMD4: a learned per-value polynomial schedule, trained with REINFORCE-LOO."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               example_shape: tuple[int, ...], num_classes: int = 0):
    super().__init__(config, vocab_size, example_shape, num_classes)
    self.learned_schedule = learned_schedule.LearnedPolySchedule(
        vocab_size, init_power=config.genmd4.init_power)

  def init(self, rng: Array) -> Params:
    rng_network, rng_schedule = jax.random.split(rng)
    params = super().init(rng_network)
    params["schedule"] = self.learned_schedule.init(rng_schedule)["params"]
    return params

  def power(self, params: Params) -> Array:
    """The exponents w [V]."""
    return self.learned_schedule.apply({"params": params["schedule"]})

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> tuple[Array, Metrics]:
    """(surrogate per token, whose gradient is the NELBO's; metrics with "nelbo" [B])."""
    rng_loss, rng_dropout = jax.random.split(rng)
    predict = self.predict_fn(params, batch.get("label"), train, rng_dropout)
    surrogate, nelbo, aux = genmd4.loss(
        predict, batch["x"], rng_loss, power=self.power(params), vocab_size=self.vocab_size,
        t1=self.config.genmd4.t1, eps=self.schedule.eps,
        antithetic=self.config.antithetic_time_sampling,
        single_sample=self.config.genmd4.single_sample)
    num_tokens = math.prod(self.example_shape)
    return surrogate.mean() / num_tokens, {"nelbo": nelbo, **aux}

  def sample(self, params: Params, rng: Array, num_samples: int,
             label: Array | None = None) -> Array:
    return genmd4.sample(
        self.predict_fn(params, label), rng, shape=(num_samples, *self.example_shape),
        vocab_size=self.vocab_size, power=self.power(params), steps=self.config.sample_steps,
        grid=self.config.sample_grid)


def create(config: ml_collections.ConfigDict, vocab_size: int,
           example_shape: tuple[int, ...], num_classes: int = 0) -> MD4:
  """The model for config.model_type."""
  model_classes = {"md4": MD4, "genmd4": GenMD4}
  if config.model_type not in model_classes:
    raise ValueError(f"config.model_type={config.model_type!r}; valid: {sorted(model_classes)}")
  return model_classes[config.model_type](config, vocab_size, example_shape, num_classes)
