"""Models: a network and the diffusion math behind one interface, and their registry.

A model owns its Flax network(s) and turns parameters into the `predict_fn`
that the pure loss and sampler functions take, and into the `Space` its
samplers walk (`md4.samplers`). Parameters are a dict {"network": ...}
(GenMD4 adds {"schedule": ...}). `MODEL_TYPES` is the one place that maps
`config.model_type` to a class; everything else asks a model what it
supports.
"""

import dataclasses
import math
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from md4 import diffusion
from md4 import genmd4
from md4 import prime
from md4 import samplers
from md4 import schedule as schedule_lib
from md4.networks import dit
from md4.networks import layers
from md4.networks import learned_schedule
from md4.networks import transformer
from md4.networks import unet
from md4.networks import uvit
from md4.runtime import progress

Array = jnp.ndarray
Params = Any
Metrics = dict[str, Array]

# What a model's sampling can do beyond its samplers (`supports` holds both).
CONDITIONS = ("prefix", "infill", "frames", "guidance")
Samples = samplers.Samples


@flax.struct.dataclass
class LossOutput:
  """One batch's loss.

  Attributes:
    objective: float32 [B], nats per sequence: what training minimises (the
      NELBO, or a surrogate with the NELBO's gradient or another objective).
    nelbo: float32 [B], nats per sequence: the bound to report.
    metrics: scalars for the training log.
  """

  objective: Array
  nelbo: Array
  metrics: Metrics


class Model(Protocol):
  """What training, evaluation and the benchmarks call."""

  vocab_size: int
  example_shape: tuple[int, ...]
  num_classes: int
  supports: frozenset[str]  # CONDITIONS and sampler names it can sample with.

  def init(self, rng: Array) -> Params:
    """Boxed (logically partitioned) parameters."""

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    """The loss of batch["x"] [B, *example_shape] (and batch["label"] [B] if labelled)."""

  def sample(self, params: Params, rng: Array, num_samples: int, *, steps: int, grid: str,
             top_p: float | None = None, prefix: Array | None = None,
             infill: tuple[Array, Array] | None = None, num_frames: int = 0,
             guidance_scale: float = 1.0, sampler: str = "ancestral", **options) -> Samples:
    """num_samples draws; prefix [N, P], infill (template, given) [N, ...] as in sampler.ancestral.

    sampler names a registered sampler (`md4.samplers`) in `supports`;
    options update its defaults. Every network call advances the open
    `progress.bar`.
    """

  def network_calls(self, sampler: str, steps: int) -> int:
    """The most network calls one `sample` makes (its nfe is at most this)."""


# config.model.backbone -> its network. A network's fields carry the names of the
# config.model keys it reads, and it is built from those keys as they are.
BACKBONES: dict[str, type[nn.Module]] = {
    "transformer": transformer.Transformer, "unet": unet.UNet, "uvit": uvit.UViT,
    "dit": dit.DiT}


def build_network(config: ml_collections.ConfigDict, vocab_size: int, num_classes: int,
                  embed: nn.Module | None = None) -> nn.Module:
  """The backbone config.model.backbone names, emitting vocab_size logits per position.

  embed maps the transformer's input ids to embeddings (default: one table of
  vocab_size + 1 rows, the mask last); the image backbones read pixel tokens.
  """
  model = config.model
  if model.backbone not in BACKBONES:
    raise ValueError(f"config.model.backbone={model.backbone!r}; valid: {', '.join(BACKBONES)}")
  network_class = BACKBONES[model.backbone]
  fields = {field.name for field in dataclasses.fields(network_class)}
  options = {key: value for key, value in model.items() if key in fields}
  options.update(vocab_size=vocab_size, num_classes=num_classes, dtype=jnp.dtype(model.dtype))
  if "embed" in fields:
    options["embed"] = embed if embed is not None else layers.SequenceEmbed(
        vocab_size + 1, model.width, model.embed_dim, embed_init=model.embed_init,
        dtype=options["dtype"])
  elif embed is not None:
    raise ValueError(f"config.model.backbone={model.backbone!r} reads pixel tokens; use "
                     "the transformer backbone for this model type")
  return network_class(**options)


class MaskedDiffusion:
  """What every model type shares: the network, its conditioning, and the request checks.

  Subclasses set `space_type` and implement `loss` and `space`.
  """

  space_type: type  # Its `samplers.Space`; its features decide which samplers it has.

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               example_shape: tuple[int, ...], num_classes: int = 0,
               embed: nn.Module | None = None):
    self.config = config
    self.vocab_size = vocab_size
    self.example_shape = tuple(example_shape)
    self.num_classes = num_classes
    self.schedule = schedule_lib.get(config.noise_schedule)
    self.network = build_network(config, vocab_size, num_classes, embed)
    # A network that ignores t gives the same output for the same input at any t: the
    # samplers reuse it exactly then (they refuse a predict_fn that reads t).
    self.network_reads_time = not (config.model.backbone == "transformer"
                                   and config.model.time_conditioning == "none")

  @classmethod
  def sampler_names(cls) -> tuple[str, ...]:
    """The registered samplers whose needs its space meets."""
    return samplers.supported(cls.space_type.features)

  @property
  def supports(self) -> frozenset[str]:
    """Its samplers, prefix and infill; frames if its space has them, guidance if labelled."""
    features = {"prefix", "infill", *self.sampler_names()}
    if "frames" in self.space_type.features:
      features.add("frames")
    if self.num_classes:
      features.add("guidance")
    return frozenset(features)

  @property
  def time_sampling(self) -> dict[str, Any]:
    """The loss's time options from the config: cont_time, timesteps, antithetic."""
    return dict(cont_time=self.config.cont_time, timesteps=self.config.timesteps,
                antithetic=self.config.antithetic_time_sampling)

  @property
  def entries_per_example(self) -> int:
    """Entries its samplers reveal one by one per example: num_tokens (Prime: l each)."""
    return self.num_tokens

  @property
  def num_tokens(self) -> int:
    """Tokens per example: L for text, H * W * 3 for images."""
    return math.prod(self.example_shape)

  def network_calls(self, sampler: str, steps: int) -> int:
    """The most network calls sampler makes (`samplers.Sampler.network_calls`)."""
    return samplers.get(sampler).network_calls(steps, self.entries_per_example)

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
    if self.config.loss_chunk_size and self.config.model.backbone == "transformer":
      return self.factored_predict_fn(params, label, train, rng_dropout), rng_loss
    return self.predict_fn(params, label, train, rng_dropout), rng_loss

  def factored_predict_fn(self, params: Params, label: Array | None, train: bool,
                          rng: Array | None) -> diffusion.Factored:
    """predict_fn split before the transformer's output layer (config.loss_chunk_size)."""
    rngs = {"dropout": rng} if train else None
    label = label if self.num_classes else None

    def features(z: Array, t: Array) -> Array:
      # The logits this apply also returns are unused: XLA drops their computation.
      _, sown = self.network.apply({"params": params["network"]}, z, t, label, train=train,
                                   rngs=rngs, mutable=[transformer.FEATURES])
      return sown[transformer.FEATURES]["output_input"][0]

    def head(hidden: Array) -> Array:
      return transformer.output_logits(params["network"], hidden, self.vocab_size,
                                       jnp.dtype(self.config.model.dtype))

    return diffusion.Factored(features, head, self.config.loss_chunk_size)

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    raise NotImplementedError

  def space(self, params: Params) -> samplers.Space:
    """The space its samplers walk."""
    raise NotImplementedError

  def sample(self, params: Params, rng: Array, num_samples: int, *, steps: int, grid: str,
             top_p: float | None = None, prefix: Array | None = None,
             infill: tuple[Array, Array] | None = None, num_frames: int = 0,
             guidance_scale: float = 1.0, sampler: str = "ancestral", **options) -> Samples:
    """num_samples draws with the EMA (or any) parameters; see Model.sample.

    Class-conditional models draw classes 0, 1, 2, ... in turn.
    """
    samplers.options(sampler, options)  # Raises ValueError naming a bad sampler or option.
    asked = {"prefix": prefix is not None, "infill": infill is not None,
             "frames": num_frames > 0, "guidance": guidance_scale != 1.0, sampler: True}
    for feature, wanted in asked.items():
      if wanted and feature not in self.supports:
        raise ValueError(f"{feature}: the {type(self).__name__} sampler of this model does "
                         f"not support it (supports: {sorted(self.supports) or 'none'})")
    labels = (jnp.arange(num_samples, dtype=jnp.int32) % self.num_classes
              if self.num_classes else None)
    predict = progress.counted(self.predict_fn(params, labels, guidance_scale=guidance_scale))
    return samplers.sample(sampler, predict, rng, self.space(params),
                           shape=(num_samples, *self.example_shape), steps=steps, grid=grid,
                           top_p=top_p, prefix=prefix, infill=infill,
                           reuse_outputs=not self.network_reads_time, num_frames=num_frames,
                           **options)


class MD4(MaskedDiffusion):
  """MD4: a fixed schedule, the continuous- or discrete-time NELBO, ancestral sampling."""

  space_type = diffusion.Tokens

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    nelbo, metrics = diffusion.loss(predict, batch["x"], rng_loss, schedule=self.schedule,
                                    vocab_size=self.vocab_size, **self.time_sampling)
    return LossOutput(objective=nelbo, nelbo=nelbo, metrics=metrics)

  def space(self, params: Params) -> diffusion.Tokens:
    del params
    return diffusion.Tokens(self.vocab_size, self.schedule)


class GenMD4(MaskedDiffusion):
  """GenMD4: a learned per-value polynomial schedule, trained with REINFORCE-LOO."""

  space_type = genmd4.ValueTokens

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
           train: bool) -> LossOutput:
    """The objective is the surrogate whose gradient is the NELBO's (same value)."""
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    surrogate, nelbo, metrics = genmd4.loss(
        predict, batch["x"], rng_loss, power=self.power(params), vocab_size=self.vocab_size,
        t1=self.config.genmd4.t1, eps=self.schedule.eps,
        antithetic=self.config.antithetic_time_sampling,
        single_sample=self.config.genmd4.single_sample)
    return LossOutput(objective=surrogate, nelbo=nelbo, metrics=metrics)

  def space(self, params: Params) -> genmd4.ValueTokens:
    """Ordered unmasking's counts and network times follow config.noise_schedule."""
    return genmd4.ValueTokens(self.vocab_size, self.power(params), self.schedule)


class Prime(MaskedDiffusion):
  """MDM-Prime: tokens as l sub-tokens masked independently; reports the valid NELBO."""

  space_type = prime.SubTokens

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int,
               example_shape: tuple[int, ...], num_classes: int = 0):
    options = config.prime
    if options.objective not in prime.OBJECTIVES:
      raise ValueError(f"config.prime.objective={options.objective!r}; valid: "
                       f"{prime.OBJECTIVES}")
    shuffle_seed = None if options.shuffle_seed < 0 else options.shuffle_seed
    codec = prime.Codec(vocab_size, None if options.binary else options.length,
                        shuffle_seed=shuffle_seed, binary=options.binary)
    # Each position's l sub-tokens read b digit values plus their mask id.
    embed = layers.SlotEmbed(codec.base + 1, codec.length, config.model.width,
                             embed_init=config.model.embed_init,
                             dtype=jnp.dtype(config.model.dtype))
    super().__init__(config, vocab_size, example_shape, num_classes, embed)
    self.codec = codec

  def network_input(self, batch_size: int) -> Array:
    return jnp.zeros((batch_size, *self.example_shape, self.codec.length), jnp.int32)

  @property
  def entries_per_example(self) -> int:
    return self.num_tokens * self.codec.length

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    """The objective is the NELBO, or in training the joint surrogate when configured."""
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    objective, metrics = prime.loss(
        predict, batch["x"], rng_loss, codec=self.codec, schedule=self.schedule,
        objective=self.config.prime.objective if train else "nelbo", **self.time_sampling)
    nelbo = metrics.pop("nelbo")
    return LossOutput(objective=objective, nelbo=nelbo, metrics=metrics)

  def space(self, params: Params) -> prime.SubTokens:
    del params
    return prime.SubTokens(self.codec, self.schedule)


def configured_sampler(config: ml_collections.ConfigDict, name: str | None = None,
                       overrides: dict | None = None) -> tuple[str, dict[str, Any]]:
  """(sampler name, its options): config.sampler (or name), its registered defaults updated
  by config.sampler_options.<name> and then by overrides; ValueError naming a bad one."""
  name = config.sampler if name is None else name
  options = {**config.sampler_options.get(name, {}), **(overrides or {})}
  return name, samplers.options(name, options)


MODEL_TYPES: dict[str, type[MaskedDiffusion]] = {"md4": MD4, "genmd4": GenMD4, "prime": Prime}


def get(model_type: str) -> type[MaskedDiffusion]:
  """The class for config.model_type; ValueError listing the valid ones otherwise."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.model_type={model_type!r}; valid: {', '.join(MODEL_TYPES)}")
  return MODEL_TYPES[model_type]


def create(config: ml_collections.ConfigDict, vocab_size: int,
           example_shape: tuple[int, ...], num_classes: int = 0) -> Model:
  """The model for config.model_type; labels condition it only if config.class_conditional."""
  num_classes = num_classes if config.class_conditional else 0
  return get(config.model_type)(config, vocab_size, example_shape, num_classes)
