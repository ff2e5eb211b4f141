"""Every config key md4 reads, with its default, and the check run before training.

Experiment files start from `get_config()` and override what they change; a
key that is not here (a typo) or a value of the wrong type is an error that
names the key, raised before anything is compiled. Every data source's
options are present under the source's name (`config.chars.path`,
`config.text8.eval_split`, ...), so `--config.dataset=chars
--config.chars.path=FILE` works from any experiment file.
"""

import json
from typing import Any

import ml_collections

from md4 import data
from md4 import samplers

ATTENTION_IMPLS = ("", "xla", "cudnn")
# Counts and sizes that only fail later (a division by zero, every checkpoint deleted) at 0.
_AT_LEAST_ONE = ("num_train_steps", "batch_size", "seq_len", "log_every_steps",
                 "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "sample_every_steps", "grad_accum_steps", "eval_num_t", "model.width",
                 "model.num_layers", "model.num_heads")


def get_config() -> ml_collections.ConfigDict:
  """The default config: a small MD4 on the synthetic Markov source."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_type = "md4"

  config.dataset = "synthetic"
  config.data_dir = "~/.cache/md4"  # Downloaded and prepared data, a folder per source.
  config.seq_len = 64
  config.update(data.default_options())

  config.noise_schedule = "linear"
  config.cont_time = True
  config.timesteps = 1000
  config.antithetic_time_sampling = True
  # Positions per chunk of the loss's logits (0: all at once): with a chunk of C the
  # loss holds float32 logits [B, C, V], not [B, L, V], forward and backward (transformer).
  config.loss_chunk_size = 0

  # backbone: "transformer" (token sequences), "unet", "uvit" or "dit" (images).
  # width, num_layers, num_heads, mlp_ratio serve the transformer, the DiT and
  # the U-ViT's middle DiT; the unet_* keys the U-Net and the U-ViT's conv
  # levels; patch_size the DiT and the U-ViT.
  # mlp_type: "swiglu", "geglu", "glu" (sigmoid gate) or "gelu" (ungated); the
  # MLP's hidden width is int(mlp_ratio * width) rounded up to a multiple of
  # mlp_multiple_of (MD4: mlp_ratio 8/3, 32 -> 2048 at width 768).
  # cond_dim: width of the time (and class) conditioning vector of the
  # transformer, U-Net and U-ViT (sinusoidal [cond_dim] -> 4 cond_dim -> cond_dim).
  # embed_dim: transformer: width of the token table, projected to width (0: a
  # table of full width); U-Net, U-ViT: per-channel token width (0: unet_channels).
  # channel_dropout: the transformer's dropout zeroes a feature for a whole
  # sequence (MD4's Dropout1d) instead of single elements.
  # embed_init, kernel_init: the transformer's initial token tables and block
  # kernels, "md4" or "reference" (the MD4 reference's laws; the standard
  # deviations: md4/networks/layers.py: EMBED_INITS, md4/networks/transformer.py: KERNEL_INITS).
  # The reference's kernels with md4's table trained best of the four pairs
  # against the reference (benchmarks/README.md, "md4 against the reference").
  config.model = ml_collections.ConfigDict(dict(
      backbone="transformer", width=128, num_layers=2, num_heads=4, mlp_ratio=4.0,
      mlp_multiple_of=1, mlp_type="swiglu", cond_dim=128, embed_dim=0,
      time_conditioning="adaln", dropout_rate=0.0, channel_dropout=False, embed_init="md4",
      kernel_init="reference", attention_impl="",
      remat_policy="none", scan_layers=False, dtype="float32", custom_kernels=True,
      unet_channels=128, unet_channel_mult=(1,), unet_num_res_blocks=32,
      unet_attention_resolutions=(), unet_norm_groups=32, patch_size=4))
  # Class conditioning (labelled datasets) and classifier-free guidance:
  # labels are dropped to the null class with probability label_dropout in
  # training; sampling mixes logits as uncond + guidance_scale (cond - uncond).
  config.class_conditional = False
  config.label_dropout = 0.1
  config.guidance_scale = 1.0
  config.prime = ml_collections.ConfigDict(dict(
      length=2, binary=False, shuffle_seed=-1, objective="nelbo"))
  config.genmd4 = ml_collections.ConfigDict(dict(
      init_power=1.0, t1=1e-3, single_sample=False))

  config.batch_size = 32
  config.grad_accum_steps = 1
  config.num_train_steps = 1000
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, warmup_steps=100, min_lr_ratio=0.0, b1=0.9, b2=0.999,
      weight_decay=0.0, grad_clip_norm=1.0))
  config.ema_rate = 0.999

  config.mesh_shape = (-1,)
  config.mesh_axes = ("data",)
  # Logical parameter axis -> mesh axis; axes missing from the mesh are dropped.
  config.sharding_rules = (("vocab", ""), ("embed", "fsdp"), ("mlp", "tensor"),
                           ("heads", "tensor"), ("head_dim", ""), ("layers", ""))

  config.log_every_steps = 50
  # Besides metrics.jsonl: comma-separated names of md4.metric_writers.WRITERS (tensorboard, wandb).
  config.writers = "tensorboard"
  config.wandb = ml_collections.ConfigDict(dict(
      project="md4", entity="", name="",  # name "": the workdir's name.
      mode="online"))  # online, offline (sync later with `wandb sync`), disabled.
  config.eval_every_steps = 500
  config.num_eval_steps = -1
  config.eval_num_t = 4  # Stratified times per held-out sequence.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  # A gs:// workdir whose store answers no request for this long ends the run with one error
  # line and exit code 75, retryable (md4/runtime/outage.py): Orbax's limit on an async save.
  config.storage_retry_seconds = 1200.0
  config.sample_every_steps = 500
  config.num_samples = 4
  config.sample_steps = 256
  config.sample_grid = samplers.engine.DEFAULT_GRID
  config.sample_top_p = 1.0
  # A registered sampler (md4.samplers); sampler_options.<name> holds the options of each,
  # with the defaults its registration gives.
  config.sampler = "ancestral"
  config.sampler_options = ml_collections.ConfigDict(
      {name: dict(entry.options) for name, entry in samplers.registry().items()
       if entry.options})
  # Samples drawn at the end of training to score against a known source (0: none).
  config.num_quality_samples = 256
  config.num_montage_frames = 8
  config.check_nans = True
  # (first, last): a jax.profiler trace of training steps first..last into WORKDIR/profile
  # (md4.runtime.profiler); () is off. Step 1 includes compiling: start later to leave it out.
  config.profile_steps = ()
  # Persistent compilation cache (md4.runtime.compilation_cache): a folder or gs:// path; "" is off.
  config.compilation_cache_dir = "~/.cache/md4/jax_compilation_cache"
  return config


def keys_reference() -> str:
  """docs/config.md's table: every key of get_config() with its type and default, in order."""
  rows = ["| key | type | default |", "| --- | --- | --- |"]

  def add(config: ml_collections.ConfigDict, prefix: str) -> None:
    for key, value in config.items():
      if isinstance(value, ml_collections.ConfigDict):
        add(value, f"{prefix}{key}.")
      else:
        shown = json.dumps(list(value) if isinstance(value, tuple) else value)
        rows.append(f"| `{prefix}{key}` | {type(value).__name__} | `{shown}` |")

  add(get_config(), "")
  return "\n".join(rows) + "\n"


def _check(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
           prefix: str) -> None:
  for key in config.keys():
    name = prefix + key
    if key not in reference:
      valid = ", ".join(sorted(reference.keys()))
      raise ValueError(f"unknown config key {name!r}; valid keys here: {valid}")
    value, default = config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise TypeError(f"config key {name!r} must be a ConfigDict, got {type(value).__name__}")
      _check(value, default, name + ".")
    elif not _same_type(value, default):
      raise TypeError(f"config key {name!r} must be {type(default).__name__} like its "
                      f"default {default!r}, got {type(value).__name__} {value!r}")


def _same_type(value: Any, default: Any) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys and types against the defaults and a few values; returns config."""
  from md4.runtime import metric_writers  # pylint: disable=g-import-not-at-top
  from md4 import models  # pylint: disable=g-import-not-at-top  # Flax: only when validating.
  _check(config, get_config(), "")
  metric_writers.writer_names(config)
  model_class = models.get(config.model_type)
  data.get(config.dataset)
  models.configured_sampler(config)
  if config.sampler not in model_class.sampler_names():
    raise ValueError(f"config.sampler={config.sampler!r}: model_type {config.model_type!r} "
                     f"supports {', '.join(model_class.sampler_names())}")
  if config.model.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={config.model.attention_impl!r}; valid: "
                     f"{ATTENTION_IMPLS} ('' picks cuDNN on GPU in half precision, else XLA)")
  if len(config.mesh_shape) != len(config.mesh_axes):
    raise ValueError(f"config.mesh_shape {tuple(config.mesh_shape)} and config.mesh_axes "
                     f"{tuple(config.mesh_axes)} must have the same length")
  for key in _AT_LEAST_ONE:
    group, _, name = key.rpartition(".")
    value = (config[group] if group else config)[name]
    if value < 1:
      raise ValueError(f"config.{key} must be >= 1, got {value}")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")
  profile_steps = tuple(config.profile_steps)
  if profile_steps and not (len(profile_steps) == 2 and all(type(s) is int for s in profile_steps)
                            and 1 <= profile_steps[0] <= profile_steps[1]):
    raise ValueError(f"config.profile_steps must be () or (first, last) with 1 <= first <= "
                     f"last, got {profile_steps}")
  if not config.optimizer.learning_rate > 0:
    raise ValueError(f"config.optimizer.learning_rate must be > 0, got "
                     f"{config.optimizer.learning_rate}")
  return config
