"""Models: a network and the diffusion math behind one interface, and their registry.

A model owns its Flax network(s) and turns parameters into the `predict_fn`
that the pure loss and sampler functions take. Parameters are a dict
{"network": ...} (GenMD4 adds {"schedule": ...}). `MODEL_TYPES` is the one
place that maps `config.model_type` to a class; everything else asks a model
what it supports.
"""

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
from md4 import progress
from md4 import sampler as sampler_lib
from md4 import schedule as schedule_lib
from md4.networks import dit
from md4.networks import layers
from md4.networks import learned_schedule
from md4.networks import transformer
from md4.networks import unet
from md4.networks import uvit

Array = jnp.ndarray
Params = Any
Metrics = dict[str, Array]

# What a model's sampler can do beyond unconditional draws ("frames": ancestral only), and
# the samplers (`sampler_lib.SAMPLERS`) it has.
SAMPLERS = sampler_lib.SAMPLERS
FEATURES = ("prefix", "infill", "frames", "guidance") + SAMPLERS


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


@flax.struct.dataclass
class Samples:
  """A sampler's output.

  Attributes:
    tokens: int32 [N, *example_shape], no mask id left.
    frames: int32 [F, N, *example_shape] snapshots of the reverse process
      (mask id included), or None.
    nfe: int32 [], network evaluations spent.
  """

  tokens: Array
  frames: Array | None
  nfe: Array


class Model(Protocol):
  """What training, evaluation and the benchmarks call."""

  vocab_size: int
  example_shape: tuple[int, ...]
  num_classes: int
  supports: frozenset[str]  # A subset of FEATURES.

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

    sampler names one of `sampler_lib.SAMPLERS` in `supports`; options are its
    own (`sampler.SAMPLER_OPTIONS`). Every network call advances the open
    `progress.bar`.
    """

  def network_calls(self, sampler: str, steps: int) -> int:
    """The most network calls one `sample` makes (its nfe is at most this)."""


def build_network(config: ml_collections.ConfigDict, num_outputs: int, num_classes: int,
                  embed: nn.Module | None = None) -> nn.Module:
  """The backbone config.model.backbone names, emitting num_outputs logits per position.

  embed maps the transformer's input ids to embeddings (default: one table of
  num_outputs + 1 rows, the mask last); the image backbones read pixel tokens.
  """
  model = config.model
  dtype = jnp.dtype(model.dtype)
  if model.backbone in ("unet", "uvit", "dit") and embed is not None:
    raise ValueError(f"config.model.backbone={model.backbone!r} reads pixel tokens; use "
                     "the transformer backbone for this model type")
  if model.backbone == "unet":
    return unet.UNet(
        vocab_size=num_outputs, channels=model.unet_channels,
        channel_mult=tuple(model.unet_channel_mult), num_res_blocks=model.unet_num_res_blocks,
        attention_resolutions=tuple(model.unet_attention_resolutions),
        num_heads=model.num_heads, dropout=model.dropout_rate,
        token_embed_dim=model.embed_dim or model.unet_channels, cond_dim=model.cond_dim,
        num_classes=num_classes, norm_groups=model.unet_norm_groups, dtype=dtype,
        attention_impl=model.attention_impl, custom_kernels=model.custom_kernels)
  if model.backbone == "uvit":
    return uvit.UViT(
        vocab_size=num_outputs, channels=model.unet_channels,
        channel_mult=tuple(model.unet_channel_mult), num_res_blocks=model.unet_num_res_blocks,
        dit_width=model.width, dit_depth=model.num_layers, dit_num_heads=model.num_heads,
        mlp_ratio=model.mlp_ratio, patch_size=model.patch_size, dropout=model.dropout_rate,
        token_embed_dim=model.embed_dim or model.unet_channels, cond_dim=model.cond_dim,
        num_classes=num_classes, norm_groups=model.unet_norm_groups, dtype=dtype,
        attention_impl=model.attention_impl, custom_kernels=model.custom_kernels)
  if model.backbone == "dit":
    return dit.DiT(
        vocab_size=num_outputs, patch_size=model.patch_size, width=model.width,
        depth=model.num_layers, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
        dropout=model.dropout_rate, num_classes=num_classes, dtype=dtype,
        attention_impl=model.attention_impl, custom_kernels=model.custom_kernels)
  if model.backbone != "transformer":
    raise ValueError(f"config.model.backbone={model.backbone!r}; valid: transformer, unet, "
                     "uvit, dit")
  if embed is None:
    embed = layers.SequenceEmbed(num_outputs + 1, model.width, model.embed_dim,
                                 embed_init=model.embed_init, dtype=dtype)
  return transformer.Transformer(
      embed=embed, num_outputs=num_outputs, width=model.width,
      num_layers=model.num_layers, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
      mlp_multiple_of=model.mlp_multiple_of, mlp_type=model.mlp_type, cond_dim=model.cond_dim,
      time_conditioning=model.time_conditioning, num_classes=num_classes,
      dropout_rate=model.dropout_rate, channel_dropout=model.channel_dropout,
      kernel_init=model.kernel_init, attention_impl=model.attention_impl,
      remat_policy=model.remat_policy,
      scan_layers=model.scan_layers, dtype=dtype, custom_kernels=model.custom_kernels)


class MaskedDiffusion:
  """What every model type shares: the network, its conditioning, and the request checks.

  Subclasses set `supports` and implement `loss` and `_draw`.
  """

  supports: frozenset[str] = frozenset()

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
    if num_classes:
      self.supports = self.supports | {"guidance"}

  @property
  def num_tokens(self) -> int:
    """Tokens per example: L for text, H * W * 3 for images."""
    return math.prod(self.example_shape)

  def network_calls(self, sampler: str, steps: int) -> int:
    """steps; first-hitting: one call per token."""
    return self.num_tokens if sampler == "first_hitting" else steps

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
           train: bool) -> LossOutput:
    raise NotImplementedError

  def sample(self, params: Params, rng: Array, num_samples: int, *, steps: int, grid: str,
             top_p: float | None = None, prefix: Array | None = None,
             infill: tuple[Array, Array] | None = None, num_frames: int = 0,
             guidance_scale: float = 1.0, sampler: str = "ancestral", **options) -> Samples:
    """num_samples draws with the EMA (or any) parameters; see Model.sample.

    Class-conditional models draw classes 0, 1, 2, ... in turn.
    """
    options = sampler_lib.sampler_options(sampler, options)
    asked = {"prefix": prefix is not None, "infill": infill is not None,
             "frames": num_frames > 0, "guidance": guidance_scale != 1.0, sampler: True}
    for feature, wanted in asked.items():
      if wanted and feature not in self.supports:
        raise ValueError(f"{feature}: the {type(self).__name__} sampler of this model does "
                         f"not support it (supports: {sorted(self.supports) or 'none'})")
    if num_frames and sampler != "ancestral":
      raise ValueError(f"frames: only the ancestral sampler records them, not {sampler!r}")
    labels = (jnp.arange(num_samples, dtype=jnp.int32) % self.num_classes
              if self.num_classes else None)
    predict = progress.counted(self.predict_fn(params, labels, guidance_scale=guidance_scale))
    kwargs = dict(steps=steps, grid=grid, top_p=top_p, prefix=prefix, infill=infill)
    shape = (num_samples, *self.example_shape)
    if sampler == "ancestral":
      return self._draw(params, predict, rng, shape, num_frames=num_frames, **kwargs)
    return self._draw_with(sampler, params, predict, rng, shape, options, **kwargs)

  def _draw(self, params: Params, predict, rng: Array, shape: tuple[int, ...], *,
            steps: int, grid: str, top_p: float | None, prefix: Array | None,
            infill: tuple[Array, Array] | None, num_frames: int) -> Samples:
    """The ancestral sampler."""
    raise NotImplementedError

  def _draw_with(self, name: str, params: Params, predict, rng: Array,
                 shape: tuple[int, ...], options: dict, *, steps: int, grid: str,
                 top_p: float | None, prefix: Array | None,
                 infill: tuple[Array, Array] | None) -> Samples:
    """Sampler `name` (in supports, not ancestral) with its keyword options."""
    raise NotImplementedError


class MD4(MaskedDiffusion):
  """MD4: a fixed schedule, the continuous- or discrete-time NELBO, ancestral sampling."""

  supports = frozenset({"prefix", "infill", "frames", *sampler_lib.SAMPLERS})

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    nelbo, metrics = diffusion.loss(
        predict, batch["x"], rng_loss, schedule=self.schedule, vocab_size=self.vocab_size,
        cont_time=self.config.cont_time, timesteps=self.config.timesteps,
        antithetic=self.config.antithetic_time_sampling)
    return LossOutput(objective=nelbo, nelbo=nelbo, metrics=metrics)

  def _draw(self, params, predict, rng, shape, *, steps, grid, top_p, prefix, infill,
            num_frames) -> Samples:
    del params
    outputs = sampler_lib.ancestral(
        predict, rng, shape=shape, vocab_size=self.vocab_size, schedule=self.schedule,
        steps=steps, grid=grid, top_p=top_p, prefix=prefix, infill=infill,
        reuse_outputs=not self.network_reads_time, return_nfe=True, num_frames=num_frames)
    tokens, nfe = outputs[:2]
    return Samples(tokens=tokens, frames=outputs[2] if num_frames else None, nfe=nfe)

  def _draw_with(self, name, params, predict, rng, shape, options, *, steps, grid, top_p,
                 prefix, infill) -> Samples:
    del params
    common = dict(shape=shape, vocab_size=self.vocab_size, schedule=self.schedule,
                  top_p=top_p, prefix=prefix, infill=infill, return_nfe=True)
    reuse = not self.network_reads_time
    if name == "first_hitting":
      tokens, nfe = sampler_lib.first_hitting(predict, rng, **common)
    elif name == "remdm":
      tokens, nfe = sampler_lib.remdm(predict, rng, steps=steps, grid=grid,
                                      reuse_outputs=reuse, **common, **options)
    else:
      tokens, nfe = sampler_lib.sample_ordered(predict, rng, steps=steps, grid=grid,
                                               reuse_outputs=reuse, **common, **options)
    return Samples(tokens=tokens, frames=None, nfe=nfe)


class GenMD4(MaskedDiffusion):
  """GenMD4: a learned per-value polynomial schedule, trained with REINFORCE-LOO."""

  # Ordered unmasking needs no schedule; ReMDM and first-hitting would need one per value.
  supports = frozenset({"prefix", "infill", "ancestral", "maskgit", "llada", "blocks"})

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

  def _draw(self, params, predict, rng, shape, *, steps, grid, top_p, prefix, infill,
            num_frames) -> Samples:
    del num_frames
    if top_p is not None:
      raise ValueError("top_p: the GenMD4 sampler (genmd4.sample) has no top-p sampling")
    tokens, nfe = genmd4.sample(
        predict, rng, shape=shape, vocab_size=self.vocab_size, power=self.power(params),
        steps=steps, grid=grid, prefix=prefix, infill=infill,
        reuse_outputs=not self.network_reads_time, return_nfe=True)
    return Samples(tokens=tokens, frames=None, nfe=nfe)

  def _draw_with(self, name, params, predict, rng, shape, options, *, steps, grid, top_p,
                 prefix, infill) -> Samples:
    """Ordered unmasking; its counts and network times follow config.noise_schedule."""
    del params, name
    tokens, nfe = sampler_lib.sample_ordered(
        predict, rng, shape=shape, vocab_size=self.vocab_size, schedule=self.schedule,
        steps=steps, grid=grid, top_p=top_p, prefix=prefix, infill=infill,
        reuse_outputs=not self.network_reads_time, return_nfe=True, **options)
    return Samples(tokens=tokens, frames=None, nfe=nfe)


class Prime(MaskedDiffusion):
  """MDM-Prime: tokens as l sub-tokens masked independently; reports the valid NELBO."""

  # ReMDM would remask sub-tokens against carry-over; not derived for partial masking.
  supports = frozenset({"prefix", "infill", "ancestral", "maskgit", "llada", "blocks",
                        "first_hitting"})

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

  def network_calls(self, sampler: str, steps: int) -> int:
    """steps; first-hitting: one call per sub-token."""
    return self.num_tokens * self.codec.length if sampler == "first_hitting" else steps

  def loss(self, params: Params, batch: dict[str, Array], rng: Array,
           train: bool) -> LossOutput:
    """The objective is the NELBO, or in training the joint surrogate when configured."""
    predict, rng_loss = self.loss_predict_fn(params, batch, rng, train)
    objective, metrics = prime.loss(
        predict, batch["x"], rng_loss, codec=self.codec, schedule=self.schedule,
        cont_time=self.config.cont_time, timesteps=self.config.timesteps,
        antithetic=self.config.antithetic_time_sampling,
        objective=self.config.prime.objective if train else "nelbo")
    nelbo = metrics.pop("nelbo")
    return LossOutput(objective=objective, nelbo=nelbo, metrics=metrics)

  def _draw(self, params, predict, rng, shape, *, steps, grid, top_p, prefix, infill,
            num_frames) -> Samples:
    del params, num_frames
    tokens, nfe = prime.sample(
        predict, rng, shape=shape, codec=self.codec, schedule=self.schedule, steps=steps,
        grid=grid, top_p=top_p, prefix=prefix, infill=infill,
        reuse_outputs=not self.network_reads_time, return_nfe=True)
    return Samples(tokens=tokens, frames=None, nfe=nfe)

  def _draw_with(self, name, params, predict, rng, shape, options, *, steps, grid, top_p,
                 prefix, infill) -> Samples:
    del params
    common = dict(shape=shape, codec=self.codec, schedule=self.schedule, top_p=top_p,
                  prefix=prefix, infill=infill)
    if name == "first_hitting":
      tokens, nfe = prime.sample_first_hitting(predict, rng, **common)
    else:
      tokens, nfe = prime.sample_ordered(predict, rng, steps=steps, grid=grid,
                                         reuse_outputs=not self.network_reads_time,
                                         **common, **options)
    return Samples(tokens=tokens, frames=None, nfe=nfe)


def configured_sampler(config: ml_collections.ConfigDict, name: str | None = None,
                       overrides: dict | None = None) -> tuple[str, dict[str, Any]]:
  """(sampler name, its options): config.sampler (or name) with config.sampler_options.<name>
  updated by overrides; a threshold of 0 means none."""
  name = config.sampler if name is None else name
  options = dict(config.sampler_options.get(name, {}))
  options.update(overrides or {})
  if options.get("threshold") == 0.0:
    options["threshold"] = None
  sampler_lib.sampler_options(name, options)
  return name, options


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
