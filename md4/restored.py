"""A trained model restored from a workdir: its EMA parameters, their NELBO and samples.

What `python -m md4.evaluate` (the command) and `md4.load` (notebooks) share.
The model, data and mesh are rebuilt from the config the checkpoint was
trained with (stored in it; DIR/config.json may have changed since); the EMA
parameters of the checkpoint (what training's evaluation uses) are restored,
alone, and checked against their checksums.
"""

import dataclasses
import os
from typing import Any, Iterator

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4 import defaults
from md4 import likelihood
from md4 import models
from md4 import samplers
from md4 import trainer as trainer_lib
from md4.data import alphabet
from md4.data import pipeline
from md4.runtime import checkpointing
from md4.runtime import compilation_cache
from md4.runtime import progress
from md4.runtime import sharding as sharding_lib
from md4.runtime import storage

Batch = dict[str, np.ndarray]

SPLITS = ("eval", "train")
DTYPES = ("float32", "bfloat16")
INFILL_BLANK = "_"


@dataclasses.dataclass
class Checkpoint:
  """A trained model restored from a workdir.

  Attributes:
    workdir: the training workdir.
    step: the checkpoint's training step.
    config: the workdir's config (batch_size and model.dtype possibly overridden).
    dataset: the config's data, for shapes, text encoding and the held-out split.
    model: the config's model.
    mesh: the devices, as the config lays them out.
    params_sharding: how params are sharded.
    params: the EMA parameters.
  """

  workdir: epath.Path
  step: int
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: models.Model
  mesh: jax.sharding.Mesh
  params_sharding: Any
  params: Any


def load_config(workdir: str | os.PathLike,
                step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
  """(step, the config checkpoint `step` (default: the latest) of workdir was trained with)."""
  storage.use_emulator_if_set()
  workdir = epath.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise ValueError(f"workdir={str(workdir)!r} is not a directory")
  path = workdir / "config.json"
  if not path.exists():
    raise ValueError(f"{path} not found: workdir={str(workdir)!r} holds no training run "
                     "(train.train_and_evaluate writes config.json there)")
  step, config = checkpointing.read_config(workdir, step)
  return step, defaults.validate(config)


def check_overrides(batch_size: int | None, dtype: str | None) -> None:
  """Raises ValueError naming a bad batch_size or dtype of `restore` (None: the config's)."""
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")


def restore(workdir: str | os.PathLike, step: int | None = None,
            batch_size: int | None = None, dtype: str | None = None) -> Checkpoint:
  """The EMA parameters of checkpoint `step` (default: the latest) of workdir.

  batch_size overrides config.batch_size (sequences per evaluation batch,
  before tiling by num_t); dtype overrides the compute precision
  config.model.dtype ("float32", "bfloat16").
  """
  workdir = epath.Path(workdir).expanduser()
  step, config = load_config(workdir, step)
  compilation_cache.enable(config)
  check_overrides(batch_size, dtype)
  if batch_size is not None:
    config.batch_size = batch_size
  if dtype is not None:
    config.model.dtype = dtype
  # Training's antithetic times over the tiled batch are what stratify the times.
  config.antithetic_time_sampling = True
  config.grad_accum_steps = 1  # Evaluation has no micro-batches.
  dataset, trainer = trainer_lib.build(config)
  step, params = checkpointing.restore_ema_params(workdir, step, trainer.init,
                                                  trainer.state_sharding)
  return Checkpoint(workdir, step, config, dataset, trainer.model, trainer.mesh,
                    trainer.state_sharding.ema_params, params)


def nelbo_per_sequence(checkpoint: Checkpoint, batches: Iterator[Batch], *, num_t: int = 8,
                       num_batches: int = -1, seed: int = 0) -> np.ndarray:
  """Stratified NELBO estimates float64 [N], nats per sequence (`md4.likelihood`)."""
  step = likelihood.compile_eval_step(checkpoint.config, checkpoint.model, checkpoint.mesh,
                                      checkpoint.params_sharding, num_t)
  return likelihood.nelbo_per_sequence(step, checkpoint.params, batches,
                                       sharding_lib.batch_sharding(checkpoint.mesh),
                                       num_batches=num_batches, seed=seed)


def check_split(split: str, num_batches: int) -> None:
  """Raises ValueError unless split is one of SPLITS (with num_batches >= 1 for "train")."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; valid: {SPLITS}")
  if split == "train" and num_batches < 1:
    raise ValueError("split='train' is endless: give num_eval_batches >= 1")


def split_batches(checkpoint: Checkpoint, split: str, num_batches: int) -> Iterator[Batch]:
  """Batches of the config's dataset: its held-out split, or (num_batches of) training data."""
  check_split(split, num_batches)
  if split == "eval":
    return checkpoint.dataset.eval_batches()
  return (next(checkpoint.dataset.train) for _ in range(num_batches))


def text_file_batches(checkpoint: Checkpoint, path: str) -> Iterator[Batch]:
  """The text at path, in the model's vocabulary (`Dataset.read_text`), in chunks of seq_len."""
  dataset, config = checkpoint.dataset, checkpoint.config
  if dataset.read_text is None:
    raise ValueError(f"text_file needs a model of text; this one was trained on "
                     f"{config.dataset!r} ({dataset.modality})")
  try:
    ids = dataset.read_text(path)
  except (OSError, ValueError) as error:
    raise ValueError(f"text_file={path!r}: {error}") from error
  source = pipeline.ChunkSource(ids, config.seq_len)
  if len(source) < config.batch_size:
    raise ValueError(f"text_file={path!r} makes {len(source)} sequences of "
                     f"seq_len={config.seq_len}, fewer than one batch of {config.batch_size}: "
                     "give more text or a smaller batch_size")
  return pipeline.eval_iterator_fn(source, config.batch_size)()


def encode(checkpoint: Checkpoint, text: str, what: str, offset: int = 0) -> np.ndarray:
  """Token ids int32 [n] of prompt text; `what` names the flag in errors.

  offset: where text starts in the flag's value, so that an error names the
  character's offset in what the user gave.
  """
  if checkpoint.dataset.encode is None:
    raise ValueError(f"{what} takes text; this model was trained on "
                     f"{checkpoint.config.dataset!r} ({checkpoint.dataset.modality})")
  try:
    return checkpoint.dataset.encode(text)
  except alphabet.OutsideAlphabetError as error:
    raise ValueError(f"{what}: {error.moved(offset)}") from error
  except ValueError as error:
    raise ValueError(f"{what}: {error}") from error


def infill_template(checkpoint: Checkpoint, template: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [L], given bool [L]) from a template where '_' marks a position to generate.

  Each '_' is one position; the text between blanks is encoded on its own
  (a character model gives each character its position). Positions after
  the template are generated.
  """
  length = checkpoint.model.num_tokens
  ids, given = [], []
  offset = 0  # Of the piece in template.
  for index, piece in enumerate(template.split(INFILL_BLANK)):
    if index > 0:
      ids.append(0)
      given.append(False)
      offset += len(INFILL_BLANK)
    if piece:
      piece_ids = encode(checkpoint, piece, "infill", offset)
      ids.extend(piece_ids.tolist())
      given.extend([True] * len(piece_ids))
    offset += len(piece)
  if len(ids) > length:
    raise ValueError(f"infill template makes {len(ids)} positions, more than the model's "
                     f"{length}")
  padding = length - len(ids)
  return (np.asarray(ids + [0] * padding, np.int32),
          np.asarray(given + [False] * padding, np.bool_))


def check_sampling(num_samples: int | None, steps: int | None, grid: str | None,
                   top_p: float | None) -> None:
  """Raises ValueError naming a bad sampling setting; None (the config's value) passes."""
  if num_samples is not None and num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if steps is not None or grid is not None:  # time_grid raises naming a bad steps or grid.
    samplers.engine.time_grid(1 if steps is None else steps,
                              samplers.engine.DEFAULT_GRID if grid is None else grid)
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_settings(config: ml_collections.ConfigDict, num_samples: int | None = None,
                    steps: int | None = None, grid: str | None = None,
                    top_p: float | None = None) -> dict[str, Any]:
  """{"num_samples", "steps", "grid", "top_p"}: each value given, else the config's."""
  configured = {"num_samples": config.num_samples, "steps": config.sample_steps,
                "grid": config.sample_grid, "top_p": config.sample_top_p}
  given = {"num_samples": num_samples, "steps": steps, "grid": grid, "top_p": top_p}
  return {key: configured[key] if given[key] is None else given[key] for key in configured}


def generate(checkpoint: Checkpoint, rng: jax.Array, *, num_samples: int | None = None,
             steps: int | None = None, grid: str | None = None, top_p: float | None = None,
             prefix: str | None = None, infill: str | None = None, sampler: str | None = None,
             sampler_options: dict[str, Any] | None = None) -> models.Samples:
  """Samples with the EMA parameters; prefix: text every sample starts with;
  infill: a template (`infill_template`); sampler and its options as in docs/sampling.md.

  num_samples, steps, grid and top_p default to the checkpoint's config (`sample_settings`).
  """
  settings = sample_settings(checkpoint.config, num_samples, steps, grid, top_p)
  check_sampling(**settings)
  num_samples, steps, grid, top_p = (settings["num_samples"], settings["steps"],
                                     settings["grid"], settings["top_p"])
  conditions = {}
  if prefix is not None:
    prefix_ids = encode(checkpoint, prefix, "prefix")
    if len(prefix_ids) > checkpoint.model.num_tokens:
      raise ValueError(f"prefix makes {len(prefix_ids)} positions, more than the model's "
                       f"{checkpoint.model.num_tokens}")
    conditions["prefix"] = jnp.asarray(np.tile(prefix_ids, (num_samples, 1)))
  if infill is not None:
    template, given = infill_template(checkpoint, infill)
    conditions["infill"] = (jnp.asarray(np.tile(template, (num_samples, 1))),
                            jnp.asarray(np.tile(given, (num_samples, 1))))
  model, config = checkpoint.model, checkpoint.config
  name, options = models.configured_sampler(config, sampler, sampler_options)

  def draw(params: Any, rng: jax.Array) -> models.Samples:
    return model.sample(params, rng, num_samples, steps=steps, grid=grid,
                        top_p=None if top_p >= 1.0 else top_p,
                        guidance_scale=config.guidance_scale, sampler=name, **conditions,
                        **options)

  replicated = sharding_lib.replicated(checkpoint.mesh)
  draw = jax.jit(sharding_lib.traced_with_rules(config, checkpoint.mesh, draw),
                 in_shardings=(checkpoint.params_sharding, replicated),
                 out_shardings=replicated)
  with progress.bar(model.network_calls(name, steps), f"sampling {num_samples}", "call"):
    return jax.device_get(draw(checkpoint.params, rng))
