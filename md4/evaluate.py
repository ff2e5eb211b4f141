"""NELBO evaluation and sampling from a trained checkpoint.

    python -m md4.evaluate --workdir=DIR [--step=N] [--split=eval] [--num_t=8]
    python -m md4.evaluate --workdir=DIR --text_file=other.txt       # zero-shot, characters
    python -m md4.evaluate --workdir=DIR --token_corpus=PREPARED_DIR  # zero-shot, word pieces
    python -m md4.evaluate --workdir=DIR --nonelbo --sample --prefix="the cat"
    python -m md4.evaluate --workdir=DIR --nonelbo --sample --infill="the ____ sat on the ___"

The model, data and mesh are rebuilt from DIR/config.json; the EMA parameters
of the checkpoint (what training's evaluation uses) are restored, alone.

Low-variance NELBO: every batch of B sequences is tiled K = num_t times,
copy-major (row kB + j is sequence j), and evaluated as one batch of KB with
antithetic times t_r = (u + r / KB) mod 1 (`diffusion.sample_times`). Sequence
j then gets the K times (u + j / KB + k / K) mod 1, k = 0..K-1: one in each
of K strata of width 1/K, each uniform on [0, 1), with fresh masks. The K
NELBOs of a sequence are averaged into its estimate; the reported standard
error is the spread of those estimates over sequences / sqrt(N) (it counts
the choice of sequences and the Monte-Carlo noise together, and treats
sequences as independent, as training's evaluation does).

Heavy tails: where 1 - alpha_t ~ t^k near t = 0, one masked token at a small
t weighs k/t and is masked with probability ~ L t^k, so P(estimate > x) ~
x^-(k+1). For linear and cosine (k = 1) that is x^-2: with few sequences the
mean tends to come out low and the standard error understates the spread
(measured on a small model: a one-time evaluation 3.6 of its own standard
errors below the 128-time value). Stratification does not remove that tail;
more sequences and times shrink its effect. poly2 and poly3 (k = 2, 3) have
lighter tails.

Results go to OUT/results_step_<N>.json (OUT = DIR/eval or --output_dir),
merged with what earlier runs at that step wrote, and a summary to stdout.
"""

import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
from typing import Any, Iterator

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from md4 import data as data_lib
from md4 import defaults
from md4 import models
from md4 import sampler as sampler_lib
from md4 import train
from md4.data import alphabet
from md4.data import chars
from md4.data import tokens

Array = jnp.ndarray
Batch = dict[str, np.ndarray]

SPLITS = ("eval", "train")
CHAR_DATASETS = ("text8", "chars", "synthetic")
IMAGE_DATASETS = ("cifar10", "imagenet64")
INFILL_BLANK = "_"
RESULTS_DIR = "eval"


@dataclasses.dataclass
class Checkpoint:
  """A trained model restored from a workdir.

  Attributes:
    workdir: the training workdir.
    step: the checkpoint's training step.
    config: the workdir's config (batch_size possibly overridden, antithetic
      time sampling on).
    dataset: the config's data, for shapes, decoding and the held-out split.
    model: the config's model.
    trainer: mesh, shardings and compiled steps.
    params: the EMA parameters, sharded as in training.
    compiled_nelbo: the compiled stratified NELBO per num_t, built on first use.
  """

  workdir: epath.Path
  step: int
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: models.MD4
  trainer: train.Trainer
  params: Any
  compiled_nelbo: dict[int, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_tokens(self) -> int:
    """Tokens per example: L for text, H * W * 3 for images."""
    return math.prod(self.dataset.example_shape)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a training run wrote to workdir/config.json, validated."""
  workdir = epath.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise ValueError(f"workdir={str(workdir)!r} is not a directory")
  path = workdir / "config.json"
  if not path.exists():
    raise ValueError(f"{path} not found: workdir={str(workdir)!r} holds no training run "
                     "(train.train_and_evaluate writes config.json there)")
  return defaults.validate(ml_collections.ConfigDict(json.loads(path.read_text())))


def restore(workdir: str | os.PathLike, step: int | None = None,
            batch_size: int | None = None, dtype: str | None = None) -> Checkpoint:
  """The EMA parameters of checkpoint `step` (default: the latest) of workdir.

  batch_size overrides config.batch_size: the number of sequences per
  evaluation batch (before tiling by num_t); dtype overrides the compute
  precision config.model.dtype ("float32", "bfloat16").
  """
  workdir = epath.Path(workdir).expanduser()
  config = load_config(workdir)
  checkpoints = workdir / "checkpoints"
  if not checkpoints.is_dir():
    raise ValueError(f"no checkpoints in workdir={str(workdir)!r}: {checkpoints} does not exist")
  if batch_size is not None:
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config.batch_size = batch_size
  if dtype is not None:
    config.model.dtype = dtype
  # Training's antithetic times over the tiled batch are what stratify the times.
  config.antithetic_time_sampling = True
  # A read-only manager of its own: the partial restore below needs the PyTree handler.
  manager = ocp.CheckpointManager(checkpoints, item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f"no checkpoints in workdir={str(workdir)!r}: {checkpoints} holds no "
                       "finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"step={step}: no checkpoint at that step in {checkpoints}; "
                       f"available steps: {sorted(steps)}")
    mesh = train.make_mesh(config)
    dataset = data_lib.create(config)
    model = models.create(config, dataset.vocab_size, dataset.example_shape,
                          dataset.num_classes)
    trainer = train.build_trainer(config, model, mesh)
    params = restore_ema_params(manager, trainer, step)
  finally:
    manager.close()
  logging.info("Restored the EMA parameters of step %d from %s", step, checkpoints)
  return Checkpoint(workdir, step, config, dataset, model, trainer, params)


def restore_ema_params(manager: ocp.CheckpointManager, trainer: train.Trainer,
                       step: int) -> Any:
  """TrainState.ema_params of checkpoint `step`, sharded as in training; nothing else is read."""
  state_shapes = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state_shapes.ema_params, trainer.state_sharding.ema_params)
  item = {"ema_params": abstract}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored.state["ema_params"]


def _nelbo_fn(checkpoint: Checkpoint, num_t: int):
  """Compiled (params, global batch [B, ...], rng) -> NELBO nats [B], means over num_t times."""
  if num_t not in checkpoint.compiled_nelbo:
    trainer = checkpoint.trainer
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    checkpoint.compiled_nelbo[num_t] = jax.jit(
        functools.partial(train.eval_step, trainer.model, trainer.batch_sharding, num_t),
        in_shardings=(trainer.state_sharding.ema_params, trainer.batch_sharding, replicated),
        out_shardings=replicated)
  return checkpoint.compiled_nelbo[num_t]


def nelbo_per_sequence(checkpoint: Checkpoint, batches: Iterator[Batch], *, num_t: int = 8,
                       num_batches: int = -1, seed: int = 0) -> np.ndarray:
  """Stratified NELBO estimates float64 [N], nats per sequence (module docstring).

  batches yields this process's rows of each global batch (as
  `Dataset.eval_batches` does); num_batches > 0 stops after that many.
  """
  if isinstance(num_t, bool) or not isinstance(num_t, int) or num_t < 1:
    raise ValueError(f"num_t must be an int >= 1, got {num_t!r}")
  evaluate_batch = _nelbo_fn(checkpoint, num_t)
  rng = jax.random.PRNGKey(seed)
  estimates = []
  for index, batch in enumerate(batches):
    if 0 < num_batches <= index:
      break
    global_batch = train.global_batch(batch, checkpoint.trainer.batch_sharding)
    estimates.append(np.asarray(evaluate_batch(checkpoint.params, global_batch,
                                               jax.random.fold_in(rng, index))))
  if not estimates:
    raise ValueError("no batch to evaluate: the source is empty or num_batches is 0")
  return np.concatenate(estimates).astype(np.float64)


def summarise(nelbo_nats: np.ndarray, num_tokens: int, unit: str = "token",
              word_pieces: bool = False) -> dict[str, float]:
  """Mean and standard error of per-sequence NELBOs [N] (nats) in bits per `unit`.

  unit is "token" (text) or "dim" (images); word_pieces adds the perplexity
  exp(NELBO / L), an upper bound on the model's perplexity.
  """
  if unit not in ("token", "dim"):
    raise ValueError(f"unit must be 'token' or 'dim', got {unit!r}")
  nelbo_nats = np.asarray(nelbo_nats, np.float64)
  if nelbo_nats.ndim != 1 or len(nelbo_nats) < 2:
    raise ValueError(f"need per-sequence NELBOs [N] with N >= 2 for a standard error, got "
                     f"shape {nelbo_nats.shape}")
  bits = nelbo_nats / (num_tokens * math.log(2))
  name = f"bits_per_{unit}"
  result = {
      name: float(bits.mean()),
      f"{name}_stderr": float(bits.std(ddof=1) / math.sqrt(len(bits))),
      "nats_per_sequence": float(nelbo_nats.mean()),
      "num_sequences": len(bits),
      "tokens_per_sequence": num_tokens,
  }
  if word_pieces:
    result["perplexity"] = float(np.exp(nelbo_nats.mean() / num_tokens))
  return result


def split_batches(checkpoint: Checkpoint, split: str, num_batches: int) -> Iterator[Batch]:
  """Batches of the config's dataset: its held-out split, or (num_batches of) training data."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; valid: {SPLITS}")
  if split == "eval":
    return checkpoint.dataset.eval_batches()
  if num_batches < 1:
    raise ValueError("split='train' is endless: give num_eval_batches >= 1")
  return (next(checkpoint.dataset.train) for _ in range(num_batches))


def text_file_batches(path: str | os.PathLike, seq_len: int,
                      batch_size: int) -> Iterator[Batch]:
  """The file mapped to the text8 alphabet (md4.data.chars normalisation) in chunks of seq_len."""
  try:
    ids = chars.read_ids(str(path))
  except ValueError as error:
    raise ValueError(f"text_file={str(path)!r}: {error}") from error
  return _chunk_batches(ids, seq_len, batch_size, f"text_file={str(path)!r}")


def check_token_corpus(corpus_dir: str | os.PathLike,
                       config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The manifest of a corpus prepared by md4.data.tokens with the model's tokenizer.

  Raises ValueError unless config trained on word pieces and corpus_dir was
  tokenised by a tokenizer with the same SHA-256 as the training corpus's.
  """
  corpus_dir = pathlib.Path(corpus_dir).expanduser()
  if config.dataset != "tokens":
    raise ValueError(f"token_corpus needs a model trained on a token corpus (dataset "
                     f"'tokens'); this one was trained on {config.dataset!r}")
  manifest = _read_manifest(corpus_dir, "token_corpus")
  training_folder = tokens.folder_of(config)
  training = _read_manifest(training_folder, "the training corpus (config.data_dir)")
  if manifest["tokenizer_sha256"] != training["tokenizer_sha256"]:
    raise ValueError(
        f"token_corpus={str(corpus_dir)!r} was tokenised with a different tokenizer "
        f"(SHA-256 {manifest['tokenizer_sha256'][:12]}...) than the model's "
        f"(SHA-256 {training['tokenizer_sha256'][:12]}... in {training_folder}): prepare "
        f"it with data.tokenizer={str(_tokenizer_path(training_folder, training))!r}")
  if manifest["vocab_size"] != training["vocab_size"]:
    raise ValueError(f"token_corpus={str(corpus_dir)!r} has vocab_size "
                     f"{manifest['vocab_size']}, the model {training['vocab_size']}")
  return manifest


def token_corpus_batches(corpus_dir: str | os.PathLike, config: ml_collections.ConfigDict,
                         batch_size: int) -> Iterator[Batch]:
  """All of a prepared token corpus (checked by `check_token_corpus`) in chunks of seq_len."""
  manifest = check_token_corpus(corpus_dir, config)
  path = pathlib.Path(corpus_dir).expanduser() / tokens.TOKENS
  stream = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r",
                     shape=(manifest["num_tokens"],))
  return _chunk_batches(stream, config.seq_len, batch_size,
                        f"token_corpus={str(corpus_dir)!r}")


def _read_manifest(folder: pathlib.Path, what: str) -> dict[str, Any]:
  try:
    manifest = json.loads((folder / tokens.MANIFEST).read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"{what}: {folder} is not a corpus prepared by md4.data.tokens "
                     f"(cannot read {tokens.MANIFEST}: {error})") from error
  if "tokenizer_sha256" not in manifest:
    raise ValueError(f"{what}: {folder / tokens.MANIFEST} has no tokenizer_sha256")
  return manifest


def _tokenizer_path(folder: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
  """The SentencePiece model a prepared corpus was tokenised with."""
  model = manifest.get("tokenizer", {}).get("model")
  return pathlib.Path(model) if model else folder / tokens.TOKENIZER


def _chunk_batches(ids: np.ndarray, seq_len: int, batch_size: int,
                   what: str) -> Iterator[Batch]:
  source = data_lib.ChunkSource(ids, seq_len)
  if len(source) < batch_size:
    raise ValueError(f"{what} makes {len(source)} sequences of seq_len={seq_len}, fewer "
                     f"than one batch of {batch_size}: give more text or a smaller batch_size")
  return data_lib.eval_iterator_fn(source, batch_size)()


def encode_text(checkpoint: Checkpoint, text: str, what: str) -> np.ndarray:
  """Token ids int32 [n] of text for the model's vocabulary; what names the flag in errors."""
  dataset = checkpoint.config.dataset
  if dataset in CHAR_DATASETS:
    try:
      return alphabet.encode(text).astype(np.int32)
    except ValueError as error:
      raise ValueError(f"{what}: {error}") from error
  if dataset == "tokens":
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    folder = tokens.folder_of(checkpoint.config)
    path = _tokenizer_path(folder, _read_manifest(folder, "the training corpus"))
    processor = spm.SentencePieceProcessor(model_file=str(path))
    return np.asarray(processor.encode(text, out_type=int), np.int32)
  raise ValueError(f"{what} needs a text model; this one was trained on {dataset!r}")


def infill_template(checkpoint: Checkpoint, template: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [L], given bool [L]) from a template where '_' marks a position to generate.

  Character models: every other character is given at its position. Word
  pieces: each '_' is one token and the text between blanks is tokenised on
  its own. Positions after the template are generated.
  """
  length = checkpoint.num_tokens
  ids, given = [], []
  for index, piece in enumerate(template.split(INFILL_BLANK)):
    if index > 0:
      ids.append(0)
      given.append(False)
    if piece:
      piece_ids = encode_text(checkpoint, piece, "infill")
      ids.extend(piece_ids.tolist())
      given.extend([True] * len(piece_ids))
  if len(ids) > length:
    raise ValueError(f"infill template makes {len(ids)} positions, more than the model's "
                     f"{length}")
  padding = length - len(ids)
  return (np.asarray(ids + [0] * padding, np.int32),
          np.asarray(given + [False] * padding, np.bool_))


def generate(checkpoint: Checkpoint, rng: Array, *, num_samples: int,
             steps: int | None = None, grid: str | None = None, top_p: float | None = None,
             prefix: str | None = None, infill: str | None = None) -> np.ndarray:
  """Samples int32 [num_samples, *example_shape] with the EMA parameters.

  steps, grid and top_p default to the config's sample_steps, sample_grid and
  sample_top_p. prefix (leading text that stays) and infill (a template, see
  `infill_template`) use md4.sampler for MD4; other models use their
  model.sample, which must accept `prefix` / `infill` for those.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  config = checkpoint.config
  steps = config.sample_steps if steps is None else steps
  grid = config.sample_grid if grid is None else grid
  top_p = config.sample_top_p if top_p is None else top_p
  sampler_lib.time_grid(steps, grid)  # Raises ValueError naming a bad steps or grid.
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if config.dataset in IMAGE_DATASETS and (prefix is not None or infill is not None):
    raise ValueError(f"prefix and infill take text; this model was trained on images "
                     f"({config.dataset!r})")
  shape = (num_samples, *checkpoint.dataset.example_shape)
  conditions = {}
  if prefix is not None:
    prefix_ids = encode_text(checkpoint, prefix, "prefix")
    if len(prefix_ids) > checkpoint.num_tokens:
      raise ValueError(f"prefix makes {len(prefix_ids)} positions, more than the model's "
                       f"{checkpoint.num_tokens}")
    conditions["prefix"] = jnp.asarray(np.tile(prefix_ids, (num_samples, 1)))
  if infill is not None:
    template, given = infill_template(checkpoint, infill)
    conditions["infill"] = (jnp.asarray(np.tile(template, (num_samples, 1))),
                            jnp.asarray(np.tile(given, (num_samples, 1))))
  model = checkpoint.model
  if config.model_type == "md4":
    def draw(params: Any, rng: Array) -> Array:
      return sampler_lib.ancestral(
          model.predict_fn(params), rng, shape=shape, vocab_size=model.vocab_size,
          schedule=model.schedule, steps=steps, grid=grid,
          top_p=None if top_p >= 1.0 else top_p, **conditions)
  else:
    if top_p < 1.0 and config.model_type == "genmd4":
      raise ValueError("top_p: the GenMD4 sampler (genmd4.sample) has no top-p sampling")
    accepted = inspect.signature(model.sample).parameters
    for name in conditions:
      if name not in accepted:
        raise ValueError(f"{name}: the {config.model_type} sampler ({type(model).__name__}"
                         f".sample) has no {name} conditioning")
    sample_config = ml_collections.ConfigDict(config.to_dict())
    sample_config.update(sample_steps=steps, sample_grid=grid, sample_top_p=top_p)
    model = models.create(sample_config, model.vocab_size, model.example_shape,
                          model.num_classes)

    def draw(params: Any, rng: Array) -> Array:
      return model.sample(params, rng, num_samples, **conditions)

  trainer = checkpoint.trainer
  replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
  draw = jax.jit(draw, in_shardings=(trainer.state_sharding.ema_params, replicated),
                 out_shardings=replicated)
  return np.asarray(draw(checkpoint.params, rng))


def write_samples(checkpoint: Checkpoint, samples: np.ndarray,
                  out_dir: epath.Path) -> list[str]:
  """Writes out_dir/samples_step_<N>/sample_<i>.txt (text) or .png (images) and ids.npy."""
  folder = out_dir / f"samples_step_{checkpoint.step}"
  folder.mkdir(parents=True, exist_ok=True)
  files = []
  for index, example in enumerate(samples):
    if checkpoint.dataset.decode is not None:
      path = folder / f"sample_{index}.txt"
      path.write_text(checkpoint.dataset.decode(example) + "\n")
    else:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      path = folder / f"sample_{index}.png"
      with path.open("wb") as file:
        Image.fromarray(example.astype(np.uint8)).save(file, format="PNG")
    files.append(str(path))
  with (folder / "ids.npy").open("wb") as file:
    np.save(file, samples)
  return files


def run(workdir: str | os.PathLike, *, step: int | None = None, split: str = "eval",
        num_t: int = 8, num_eval_batches: int = -1, batch_size: int | None = None,
        seed: int = 0, text_file: str | None = None, token_corpus: str | None = None,
        nelbo: bool = True, sample: bool = False, num_samples: int | None = None,
        steps: int | None = None, grid: str | None = None, top_p: float | None = None,
        prefix: str | None = None, infill: str | None = None,
        output_dir: str | None = None, dtype: str | None = None) -> dict[str, Any]:
  """What `python -m md4.evaluate` runs (flags of the same names); returns the results.

  NELBO on text_file, else token_corpus, else the config's split; then, with
  sample, samples. Results are merged into OUT/results_step_<N>.json.
  """
  if text_file and token_corpus:
    raise ValueError("give at most one of text_file and token_corpus")
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; valid: {SPLITS}")
  if not nelbo and not sample:
    raise ValueError("nothing to do: nelbo and sample are both off")
  # The data checks that need only the config come before the (slower) restore.
  config = load_config(workdir)
  if nelbo and text_file and config.dataset not in CHAR_DATASETS:
    raise ValueError(f"text_file needs a character model (dataset one of {CHAR_DATASETS}); "
                     f"this one was trained on {config.dataset!r}")
  if nelbo and token_corpus:
    check_token_corpus(token_corpus, config)
  checkpoint = restore(workdir, step, batch_size, dtype)
  config = checkpoint.config
  out_dir = (epath.Path(output_dir).expanduser() if output_dir
             else checkpoint.workdir / RESULTS_DIR)
  results = {"workdir": str(checkpoint.workdir), "step": checkpoint.step,
             "model_type": config.model_type, "dataset": config.dataset, "nelbo": {}}
  if nelbo:
    if text_file:
      name = f"text_file:{os.path.abspath(text_file)}"
      batches = text_file_batches(text_file, config.seq_len, config.batch_size)
    elif token_corpus:
      name = f"token_corpus:{os.path.abspath(token_corpus)}"
      batches = token_corpus_batches(token_corpus, config, config.batch_size)
    else:
      name = split
      batches = split_batches(checkpoint, split, num_eval_batches)
    nats = nelbo_per_sequence(checkpoint, batches, num_t=num_t,
                              num_batches=num_eval_batches, seed=seed)
    section = summarise(nats, checkpoint.num_tokens,
                        unit="dim" if config.dataset in IMAGE_DATASETS else "token",
                        word_pieces=config.dataset == "tokens")
    section.update(num_t=num_t, seed=seed, batch_size=config.batch_size)
    entropy = checkpoint.dataset.entropy_bits_per_token
    if name == "eval" and entropy is not None:
      section["data_entropy_bits_per_token"] = entropy
    results["nelbo"][name] = section
  if sample:
    num_samples = config.num_samples if num_samples is None else num_samples
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), checkpoint.step)
    samples = generate(checkpoint, rng, num_samples=num_samples, steps=steps, grid=grid,
                       top_p=top_p, prefix=prefix, infill=infill)
    results["samples"] = {
        "num_samples": num_samples, "seed": seed,
        "steps": config.sample_steps if steps is None else steps,
        "grid": config.sample_grid if grid is None else grid,
        "top_p": config.sample_top_p if top_p is None else top_p,
        "prefix": prefix, "infill": infill,
        "files": write_samples(checkpoint, samples, out_dir) if jax.process_index() == 0 else [],
    }
  if jax.process_index() == 0:
    results["results_file"] = str(_write_results(out_dir, results))
  return results


def _write_results(out_dir: epath.Path, results: dict[str, Any]) -> epath.Path:
  """Merges results into out_dir/results_step_<N>.json: sections of this run replace old ones."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"results_step_{results['step']}.json"
  merged = {}
  if path.exists():
    try:
      merged = json.loads(path.read_text())
    except ValueError:
      logging.warning("Overwriting %s, which is not valid JSON", path)
  nelbo = {**merged.get("nelbo", {}), **results["nelbo"]}
  merged.update({key: value for key, value in results.items() if key != "results_file"})
  merged["nelbo"] = nelbo
  path.write_text(json.dumps(merged, indent=2) + "\n")
  return path


def summary(results: dict[str, Any]) -> str:
  """Human-readable lines for the results of `run`."""
  lines = [f"{results['model_type']} on {results['dataset']}, step {results['step']} of "
           f"{results['workdir']}"]
  for name, section in results["nelbo"].items():
    unit = "dim" if "bits_per_dim" in section else "token"
    bits, stderr = section[f"bits_per_{unit}"], section[f"bits_per_{unit}_stderr"]
    line = (f"  NELBO on {name}: {bits:.4f} ± {stderr:.4f} bits per {unit} "
            f"({section['num_sequences']} sequences x {section['num_t']} times)")
    if "perplexity" in section:
      line += f"; perplexity <= {section['perplexity']:.2f}"
    entropy = section.get("data_entropy_bits_per_token")
    if entropy is not None:
      line += f"; source entropy {entropy:.4f} (gap {bits - entropy:+.4f})"
    lines.append(line)
  if "samples" in results:
    files = results["samples"]["files"]
    where = os.path.dirname(files[0]) if files else "(written by process 0)"
    lines.append(f"  {results['samples']['num_samples']} samples in {where}")
  if "results_file" in results:
    lines.append(f"  results: {results['results_file']}")
  return "\n".join(lines)


def define_flags() -> None:
  """The command-line flags; defined only when run as a script (md4.main has --workdir too)."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
  flags.DEFINE_enum("split", "eval", SPLITS, "Data to evaluate the NELBO on: the config's "
                    "held-out split, or the first training batches (needs --num_eval_batches).")
  flags.DEFINE_integer("num_t", 8, "Stratified times per sequence.")
  flags.DEFINE_integer("num_eval_batches", -1, "Batches to evaluate; <= 0: all.")
  flags.DEFINE_integer("batch_size", None, "Sequences per batch (each tiled --num_t times); "
                       "default: the config's batch_size.")
  flags.DEFINE_integer("seed", 0, "Seed of the times, masks and samples.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute precision; default: the "
                    "config's model.dtype.")
  flags.DEFINE_string("text_file", None, "Zero-shot NELBO on this text (mapped to the text8 "
                      "alphabet) instead of the split.")
  flags.DEFINE_string("token_corpus", None, "Zero-shot NELBO on this corpus, prepared by "
                      "md4.data.tokens with the model's tokenizer, instead of the split.")
  flags.DEFINE_bool("nelbo", True, "Evaluate the NELBO (--nonelbo: only sample).")
  flags.DEFINE_bool("sample", False, "Write samples.")
  flags.DEFINE_integer("num_samples", None, "Default: config.num_samples.")
  flags.DEFINE_integer("steps", None, "Sampler steps; default: config.sample_steps.")
  flags.DEFINE_enum("grid", None, sampler_lib.GRIDS,
                    "Sampler time grid; default: config.sample_grid.")
  flags.DEFINE_float("top_p", None, "Nucleus mass; default: config.sample_top_p.")
  flags.DEFINE_string("prefix", None, "Leading text every sample keeps.")
  flags.DEFINE_string("infill", None, "Template: '_' marks a position to generate, every "
                      "other character is given.")
  flags.DEFINE_string("output_dir", None, "Default: WORKDIR/eval.")
  flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train.initialize_distributed()
  given = flags.FLAGS
  results = run(
      given.workdir, step=given.step, split=given.split, num_t=given.num_t,
      num_eval_batches=given.num_eval_batches, batch_size=given.batch_size, seed=given.seed,
      text_file=given.text_file, token_corpus=given.token_corpus, nelbo=given.nelbo,
      sample=given.sample, num_samples=given.num_samples, steps=given.steps,
      grid=given.grid, top_p=given.top_p, prefix=given.prefix, infill=given.infill,
      output_dir=given.output_dir, dtype=given.dtype)
  if jax.process_index() == 0:
    print(summary(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)
