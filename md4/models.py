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
from md4 import prime
from md4 import sampler
from md4 import schedule as schedule_lib
from md4.networks import dit
from md4.networks import layers
from md4.networks import learned_schedule
from md4.networks import transformer
from md4.networks import unet

Array = jnp.ndarray
Params = Any
Metrics = dict[str, Array]


def build_network(config: ml_collections.ConfigDict, num_inputs: int,
                  num_outputs: int, num_classes: int, num_slots: int | None = None) -> nn.Module:
  """The backbone named by the config, reading num_inputs ids, emitting num_outputs logits.

  num_slots: ids per position, for inputs [B, L, num_slots]; None for inputs [B, L].
  """
  model = config.model
  dtype = jnp.dtype(model.dtype)
  if model.backbone in ("unet", "dit") and num_inputs != num_outputs + 1:
    raise ValueError(f"config.model.backbone={model.backbone!r} reads pixel tokens; it "
                     "cannot take MDM-Prime sub-tokens")
  if model.backbone == "unet":
    return unet.UNet(
        vocab_size=num_outputs, channels=model.unet_channels,
        channel_mult=tuple(model.unet_channel_mult), num_res_blocks=model.unet_num_res_blocks,
        attention_resolutions=tuple(model.unet_attention_resolutions),
        num_heads=model.num_heads, dropout=model.dropout_rate, num_classes=num_classes,
        norm_groups=model.unet_norm_groups, dtype=dtype, attention_impl=model.attention_impl)
  if model.backbone == "dit":
    return dit.DiT(
        vocab_size=num_outputs, patch_size=model.patch_size, width=model.width,
        depth=model.num_layers, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
        dropout=model.dropout_rate, num_classes=num_classes, dtype=dtype,
        attention_impl=model.attention_impl)
  if model.backbone != "transformer":
    raise ValueError(f"config.model.backbone={model.backbone!r}; valid: transformer, unet, dit")
  if num_slots is None:
    embed = layers.SequenceEmbed(num_inputs, model.width, dtype)
  else:
    embed = layers.SlotEmbed(num_inputs, num_slots, model.width, dtype)
  return transformer.Transformer(
      embed=embed, num_outputs=num_outputs, width=model.width,
      num_layers=model.num_layers, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
      mlp_type=model.mlp_type, time_conditioning=model.time_conditioning,
      num_classes=num_classes, dropout_rate=model.dropout_rate,
      attention_impl=model.attention_impl, remat_policy=model.remat_policy,
      scan_layers=model.scan_layers, dtype=dtype)


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
    label = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    variables = self.network.init(rng, self.network_input(1), jnp.zeros((1,)), label)
    return {"network": variables["params"]}

  def predict_fn(self, params: Params, label: Array | None = None, train: bool = False,
                 rng: Array | None = None, guidance_scale: float = 1.0):
    """predict_fn(z, t) -> logits for the loss and sampler functions.

    With a label and guidance_scale != 1 the logits are classifier-free
    guided: uncond + guidance_scale (cond - uncond); scale 0 is unconditional.
    """
    rngs = {"dropout": rng} if train else None
    label = label if self.num_classes else None

    def apply(z: Array, t: Array, label: Array | None) -> Array:
      return self.network.apply({"params": params["network"]}, z, t, label, train=train,
                                rngs=rngs)

    def predict(z: Array, t: Array) -> Array:
      if label is None or guidance_scale == 1.0:
        return apply(z, t, label)
      unconditional = apply(z, t, None)
      if guidance_scale == 0.0:
        return unconditional
      return unconditional + guidance_scale * (apply(z, t, label) - unconditional)

    return predict

  def loss_predict_fn(self, params: Params, batch: dict[str, Array], rng: Array,
                      train: bool):
    """(predict_fn for the batch's loss, the rng left for the loss itself).

    Labels, if the model has classes, are dropped to the null class with
    probability label_dropout in training (classifier-free guidance).
    """
    rng_loss, rng_dropout, rng_label = jax.random.split(rng, 3)
    label = None
    if self.num_classes:
      label = batch["label"]
      if train and self.config.label_dropout > 0:
        drop = jax.random.bernoulli(rng_label, self.config.label_dropout, label.shape)
        label = jnp.where(drop, self.num_classes, label)
    return self.predict_fn(params, label, train, rng_dropout), rng_loss

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> tuple[Array, Metrics]:
    """(objective to minimise: NELBO nats per token, metrics with "nelbo" [B])."""
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    nelbo, aux = diffusion.loss(
        predict, batch["x"], rng_loss, schedule=self.schedule, vocab_size=self.vocab_size,
        cont_time=self.config.cont_time, timesteps=self.config.timesteps,
        antithetic=self.config.antithetic_time_sampling)
    num_tokens = math.prod(self.example_shape)
    return nelbo.mean() / num_tokens, {"nelbo": nelbo, **aux}

  def sample_labels(self, num_samples: int) -> Array | None:
    """Classes 0, 1, 2, ... for class-conditional samples, else None."""
    if not self.num_classes:
      return None
    return jnp.arange(num_samples, dtype=jnp.int32) % self.num_classes

  def sample(self, params: Params, rng: Array, num_samples: int,
             num_frames: int = 0) -> Array | tuple[Array, Array]:
    """Samples int32 [N, *example_shape], and with num_frames the reverse process [F, N, ...]."""
    predict = self.predict_fn(params, self.sample_labels(num_samples),
                              guidance_scale=self.config.guidance_scale)
    top_p = self.config.sample_top_p
    return sampler.ancestral(
        predict, rng, shape=(num_samples, *self.example_shape), vocab_size=self.vocab_size,
        schedule=self.schedule, steps=self.config.sample_steps, grid=self.config.sample_grid,
        top_p=None if top_p >= 1.0 else top_p, num_frames=num_frames)


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
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    surrogate, nelbo, aux = genmd4.loss(
        predict, batch["x"], rng_loss, power=self.power(params), vocab_size=self.vocab_size,
        t1=self.config.genmd4.t1, eps=self.schedule.eps,
        antithetic=self.config.antithetic_time_sampling,
        single_sample=self.config.genmd4.single_sample)
    num_tokens = math.prod(self.example_shape)
    return surrogate.mean() / num_tokens, {"nelbo": nelbo, **aux}

  def sample(self, params: Params, rng: Array, num_samples: int,
             num_frames: int = 0) -> Array:
    if num_frames:
      raise ValueError("num_frames: the GenMD4 sampler records no reverse-process frames")
    predict = self.predict_fn(params, self.sample_labels(num_samples),
                              guidance_scale=self.config.guidance_scale)
    return genmd4.sample(
        predict, rng, shape=(num_samples, *self.example_shape),
        vocab_size=self.vocab_size, power=self.power(params), steps=self.config.sample_steps,
        grid=self.config.sample_grid)


class Prime(MD4):
  """MDM-Prime: tokens as l sub-tokens masked independently; reports the valid NELBO."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               example_shape: tuple[int, ...], num_classes: int = 0):
    super().__init__(config, vocab_size, example_shape, num_classes)
    options = config.prime
    if options.objective not in prime.OBJECTIVES:
      raise ValueError(f"config.prime.objective={options.objective!r}; valid: "
                       f"{prime.OBJECTIVES}")
    shuffle_seed = None if options.shuffle_seed < 0 else options.shuffle_seed
    self.codec = prime.Codec(vocab_size, None if options.binary else options.length,
                             shuffle_seed=shuffle_seed, binary=options.binary)
    # The network reads sub-token states: b digit values plus their mask id.
    self.network = build_network(config, self.codec.base + 1, vocab_size, num_classes,
                                 num_slots=self.codec.length)

  def network_input(self, batch_size: int) -> Array:
    return jnp.zeros((batch_size, *self.example_shape, self.codec.length), jnp.int32)

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> tuple[Array, Metrics]:
    """(objective per token: the NELBO, or the joint surrogate when configured, in training).

    metrics["nelbo"] is the valid sub-token NELBO [B] (its batch mean with the surrogate).
    """
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    objective = self.config.prime.objective if train else "nelbo"
    per_sequence, aux = prime.loss(
        predict, batch["x"], rng_loss, codec=self.codec, schedule=self.schedule,
        cont_time=self.config.cont_time, timesteps=self.config.timesteps,
        antithetic=self.config.antithetic_time_sampling, objective=objective)
    if objective == "nelbo":
      aux["nelbo"] = per_sequence
    return per_sequence.mean() / math.prod(self.example_shape), aux

  def sample(self, params: Params, rng: Array, num_samples: int,
             num_frames: int = 0) -> Array:
    if num_frames:
      raise ValueError("num_frames: the MDM-Prime sampler records no reverse-process frames")
    predict = self.predict_fn(params, self.sample_labels(num_samples),
                              guidance_scale=self.config.guidance_scale)
    top_p = self.config.sample_top_p
    return prime.sample(
        predict, rng, shape=(num_samples, *self.example_shape), codec=self.codec,
        schedule=self.schedule, steps=self.config.sample_steps, grid=self.config.sample_grid,
        top_p=None if top_p >= 1.0 else top_p)


def create(config: ml_collections.ConfigDict, vocab_size: int,
           example_shape: tuple[int, ...], num_classes: int = 0) -> MD4:
  """The model for config.model_type; labels condition it only if config.class_conditional."""
  num_classes = num_classes if config.class_conditional else 0
  model_classes = {"md4": MD4, "genmd4": GenMD4, "prime": Prime}
  if config.model_type not in model_classes:
    raise ValueError(f"config.model_type={config.model_type!r}; valid: {sorted(model_classes)}")
  return model_classes[config.model_type](config, vocab_size, example_shape, num_classes)
