"""NELBO evaluation and sampling from a trained checkpoint.

    python -m md4.evaluate --workdir=DIR [--step=N] [--split=eval] [--num_t=8]
    python -m md4.evaluate --workdir=DIR --text_file=FILE    # zero-shot on other text
    python -m md4.evaluate --workdir=DIR --zero_shot=lambada:FILE,wikitext2:FILE,...
    python -m md4.evaluate --workdir=DIR --nonelbo --sample --prefix="the cat"
    python -m md4.evaluate --workdir=DIR --nonelbo --sample --infill="the ____ sat on the ___"
    python -m md4.evaluate --workdir=DIR --nonelbo --sample --num_samples=1024 \
        --sampler=blocks --sampler_options='{"block_size": 16}'

The checkpoint's EMA parameters are restored with the config they were
trained with (`md4.restored`). A preemption notice (SIGTERM)
ends the command within seconds with md4.runtime.errors.PREEMPTED_EXIT_CODE. The
NELBO estimate and its standard error are `md4.likelihood`'s. --text_file
reads any text for a text model, mapped to the vocabulary as the training
text was (`Dataset.read_text`; a word-piece model also takes a corpus folder
prepared with its tokenizer). --zero_shot evaluates the MD4 paper's zero-shot
sets (`md4.data.zero_shot`) and prints them as a Markdown table.

With --sample, unconditional samples are scored (`md4.sample_quality`): their
sample entropy for text, and against the true law of a known source their
log-likelihood, entropy rate and transition KL next to the source's own.
--sampler picks the sampler (`md4.samplers`), --sampler_options its
options as JSON.

Results go to OUT/results_step_<N>.json (OUT = DIR/eval or --output_dir),
merged with what earlier runs at that step wrote, samples to
OUT/samples_step_<N>.* (`md4.samples`; a later run's as samples_step_<N>_2.* and so on,
never over an earlier run's), and a summary to stdout.
"""

import dataclasses
import json
import math
import os
import typing
from typing import Any

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np

from md4 import eval_results
from md4 import judge as judge_lib
from md4 import likelihood
from md4 import models
from md4 import restored
from md4 import sample_quality
from md4 import samplers
from md4 import samples as samples_lib
from md4.data import pipeline
from md4.data import tokens
from md4.data import zero_shot
from md4.runtime import errors
from md4.runtime import preemption as preemption_lib
from md4.runtime import sharding as sharding_lib
from md4.runtime import storage

RESULTS_DIR = "eval"


@dataclasses.dataclass
class Options:
  """What `python -m md4.evaluate` does; the flags of the same names set these."""

  workdir: str
  step: int | None = None            # Checkpoint step; None: the latest.
  split: str = "eval"                # The config's held-out split, or "train" (num_eval_batches).
  num_t: int = 8                     # Stratified times per sequence.
  num_eval_batches: int = -1         # Batches to evaluate; <= 0: all.
  batch_size: int | None = None      # Sequences per batch; None: the config's batch_size.
  seed: int = 0                      # Seed of the times, masks and samples.
  dtype: str | None = None           # Compute precision; None: the config's model.dtype.
  text_file: str | None = None       # Zero-shot NELBO on this text instead of the split.
  zero_shot: str | None = None       # "NAME:PATH,...": the zero-shot table instead of the split.
  nelbo: bool = True                 # Evaluate the NELBO.
  sample: bool = False               # Write samples.
  num_samples: int | None = None     # None: config.num_samples.
  steps: int | None = None           # Sampler steps; None: config.sample_steps.
  grid: str | None = None            # Sampler time grid; None: config.sample_grid.
  top_p: float | None = None         # Nucleus mass; None: config.sample_top_p.
  sampler: str | None = None         # A registered sampler (md4.samplers); None: config.sampler.
  sampler_options: str | None = None  # JSON object over config.sampler_options.<sampler>.
  judge: str | None = None           # GPT-2-family checkpoint dir: generative perplexity.
  judge_convention: str = judge_lib.DEFAULT_CONVENTION  # One of judge.CONVENTIONS.
  prefix: str | None = None          # Leading text every sample keeps.
  infill: str | None = None          # Template: "_" marks a position to generate.
  output_dir: str | None = None      # None: WORKDIR/eval.


def parse_sampler_options(text: str | None) -> dict[str, Any]:
  """The JSON object of --sampler_options, e.g. '{"block_size": 8}'; {} for None."""
  if text is None:
    return {}
  try:
    parsed = json.loads(text)
  except ValueError as error:
    raise ValueError(f"sampler_options={text!r} is not JSON: {error}") from error
  if not isinstance(parsed, dict):
    raise ValueError(f"sampler_options must be a JSON object like '{{\"eta\": 0.02}}', "
                     f"got {text!r}")
  return parsed


def zero_shot_sections(checkpoint: restored.Checkpoint, spec: str, *, num_t: int = 8,
                       seed: int = 0) -> dict[str, dict[str, Any]]:
  """NELBOs of the zero-shot sets spec names ("NAME:PATH,..."): {"zero_shot:NAME": section}.

  Every sequence of a set is evaluated: the last batch is filled with copies
  of the first sequences, whose estimates are dropped.
  """
  config = checkpoint.config
  if config.dataset != "tokens":
    raise ValueError(f"zero_shot needs a model of a token corpus (config.dataset='tokens'), "
                     f"this one was trained on {config.dataset!r}")
  pairs = zero_shot.parse(spec)
  tokenizer = tokens.load_tokenizer(config.tokens, tokens.folder(config))
  length, batch_size = config.seq_len, config.batch_size
  sections = {}
  for name, path in pairs:
    try:
      ids = zero_shot.token_ids(name, path, tokenizer)
    except (OSError, ValueError) as error:
      raise ValueError(f"zero_shot {name}:{path}: {error}") from error
    chunks = zero_shot.sequences(ids, length)
    if len(chunks) < 2:
      raise ValueError(f"zero_shot {name}:{path} makes {len(chunks)} sequence(s) of "
                       f"seq_len={length}; a standard error needs >= 2")
    filled = np.concatenate([chunks, np.resize(chunks, (-len(chunks) % batch_size, length))])
    batches = pipeline.eval_iterator_fn(pipeline.ChunkSource(filled.reshape(-1), length),
                                        batch_size)()
    nats = restored.nelbo_per_sequence(checkpoint, batches, num_t=num_t,
                                       seed=seed)[:len(chunks)]
    section = likelihood.summarise(nats, length, word_pieces=True)
    # Delta method: perplexity = exp(ln 2 * bits), so its standard error is ln 2 * ppl * se.
    section["perplexity_stderr"] = (math.log(2) * section["perplexity"]
                                    * section["bits_per_token_stderr"])
    section.update(set=zero_shot.SETS[name].title, path=os.path.abspath(path),
                   set_tokens=len(ids), num_t=num_t, seed=seed, batch_size=batch_size)
    sections[eval_results.ZERO_SHOT + name] = section
  return sections


def check_options(options: Options) -> None:
  """Raises ValueError naming a bad option that needs no checkpoint: run checks before restoring."""
  restored.check_split(options.split, options.num_eval_batches)
  if not options.nelbo and not options.sample:
    raise ValueError("nothing to do: nelbo and sample are both off")
  if options.text_file and options.zero_shot:
    raise ValueError("give text_file or zero_shot, not both")
  if options.zero_shot:
    zero_shot.parse(options.zero_shot)
  likelihood.check_num_t(options.num_t)
  restored.check_overrides(options.batch_size, options.dtype)
  restored.check_sampling(options.num_samples, options.steps, options.grid, options.top_p)
  sampler_options = parse_sampler_options(options.sampler_options)
  if options.sampler is not None:
    samplers.options(options.sampler, sampler_options)
  judge_lib.check_convention(options.judge_convention)


def run(options: Options) -> dict[str, Any]:
  """What `python -m md4.evaluate` runs; returns the results.

  NELBO on options.text_file, else the config's split; then, with sample,
  samples. Results are merged into OUT/results_step_<N>.json.
  """
  check_options(options)
  workdir = epath.Path(options.workdir).expanduser()
  out_dir = (epath.Path(options.output_dir).expanduser() if options.output_dir
             else workdir / RESULTS_DIR)
  if options.output_dir or workdir.is_dir():  # A workdir that is not one is restore's to report.
    storage.check_writable(out_dir, "the results folder", "pass --output_dir=DIR to write the "
                           "results elsewhere")
  checkpoint = restored.restore(options.workdir, options.step, options.batch_size,
                                options.dtype)
  config, dataset = checkpoint.config, checkpoint.dataset
  results = {"workdir": str(checkpoint.workdir), "step": checkpoint.step,
             "model_type": config.model_type, "dataset": config.dataset, "nelbo": {}}
  if options.nelbo and options.zero_shot:
    results["nelbo"].update(zero_shot_sections(checkpoint, options.zero_shot,
                                               num_t=options.num_t, seed=options.seed))
  elif options.nelbo:
    if options.text_file:
      name = f"text_file:{os.path.abspath(options.text_file)}"
      batches = restored.text_file_batches(checkpoint, options.text_file)
    else:
      name = options.split
      batches = restored.split_batches(checkpoint, options.split, options.num_eval_batches)
    nats = restored.nelbo_per_sequence(checkpoint, batches, num_t=options.num_t,
                              num_batches=options.num_eval_batches, seed=options.seed)
    section = likelihood.summarise(nats, checkpoint.model.num_tokens,
                                   unit="dim" if dataset.modality == "image" else "token",
                                   word_pieces=dataset.word_pieces)
    section.update(num_t=options.num_t, seed=options.seed, batch_size=config.batch_size)
    if name == "eval" and dataset.entropy_bits_per_token is not None:
      section["data_entropy_bits_per_token"] = dataset.entropy_bits_per_token
    results["nelbo"][name] = section
  if options.sample:
    settings = restored.sample_settings(config, options.num_samples, options.steps,
                                        options.grid, options.top_p)
    rng = jax.random.fold_in(jax.random.PRNGKey(options.seed), checkpoint.step)
    sampler_name, sampler_options = models.configured_sampler(
        config, options.sampler, parse_sampler_options(options.sampler_options))
    drawn = restored.generate(checkpoint, rng, prefix=options.prefix, infill=options.infill,
                              sampler=sampler_name, sampler_options=sampler_options, **settings)
    files = []
    if jax.process_index() == 0:
      files = samples_lib.write(out_dir, samples_lib.unused_name(
          out_dir, f"samples_step_{checkpoint.step}"), np.asarray(drawn.tokens), dataset)
    quality = {}
    if options.prefix is None and options.infill is None:  # Conditioned samples follow another law.
      quality = sample_quality.scores(np.asarray(drawn.tokens), dataset, options.seed)
    if options.judge:
      if dataset.decode is None:
        raise ValueError(f"judge: generative perplexity needs a text model; this one was "
                         f"trained on {config.dataset!r} ({dataset.modality})")
      texts = [dataset.documents(tokens) for tokens in np.asarray(drawn.tokens)]
      quality.update(judge_lib.generative_perplexity(judge_lib.load(options.judge), texts,
                                                     options.judge_convention),
                     judge=os.path.abspath(os.path.expanduser(options.judge)))
    results["samples"] = {**settings, "sampler": sampler_name,
                          "sampler_options": sampler_options, "quality": quality,
                          "seed": options.seed, "prefix": options.prefix,
                          "infill": options.infill, "nfe": int(drawn.nfe), "files": files}
  if jax.process_index() == 0:
    results["results_file"] = str(eval_results.write(out_dir, results))
  return results


_HELP = {
    "workdir": "Training workdir (config.json, checkpoints/).",
    "step": "Checkpoint step; default: the latest.",
    "split": "Data to evaluate the NELBO on: the config's held-out split, or the first "
             "training batches (needs --num_eval_batches).",
    "num_t": "Stratified times per sequence.",
    "num_eval_batches": "Batches to evaluate; <= 0: all.",
    "batch_size": "Sequences per batch (each tiled --num_t times); default: the config's.",
    "seed": "Seed of the times, masks and samples.",
    "dtype": "Compute precision (float32, bfloat16); default: the config's model.dtype.",
    "text_file": "Zero-shot NELBO on this text, mapped to the model's vocabulary as its "
                 "training text was (word-piece models: also a prepared corpus folder).",
    "zero_shot": "The zero-shot table: NAME:PATH,... with NAME in "
                 f"{', '.join(zero_shot.SETS)} and PATH a local copy of the set "
                 "(docs/data.md); evaluated instead of the split.",
    "nelbo": "Evaluate the NELBO (--nonelbo: only sample).",
    "sample": "Write samples.",
    "num_samples": "Default: config.num_samples.",
    "steps": "Sampler steps; default: config.sample_steps.",
    "grid": f"Sampler time grid ({', '.join(samplers.engine.GRIDS)}); default: "
            "config.sample_grid.",
    "top_p": "Nucleus mass; default: config.sample_top_p.",
    "sampler": f"Sampler ({', '.join(samplers.names())}); default: config.sampler.",
    "sampler_options": "JSON object of sampler options over config.sampler_options.<sampler>, "
                       "e.g. '{\"block_size\": 8}'.",
    "judge": "Hugging Face GPT-2-family checkpoint directory (config.json, model.safetensors, "
             "tokenizer.json; pip install 'md4[judge]'): report the samples' generative "
             "perplexity under it.",
    "judge_convention": f"Whose generative-perplexity procedure to follow "
                        f"({', '.join(judge_lib.CONVENTIONS)}; docs/sampling.md).",
    "prefix": "Leading text every sample keeps.",
    "infill": "Template: '_' marks a position to generate, every other character is given.",
    "output_dir": "Default: WORKDIR/eval.",
}


def define_flags() -> None:
  """One flag per `Options` field, of its type; defined only when run as a command."""
  definers = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
              str: flags.DEFINE_string}
  for field in dataclasses.fields(Options):
    # `int | None` defines an integer flag without a default.
    kind = next((arg for arg in typing.get_args(field.type) if arg is not type(None)),
                field.type)
    default = None if field.default is dataclasses.MISSING else field.default
    definers[kind](field.name, default, _HELP[field.name])
  flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sharding_lib.initialize_distributed()
  given = flags.FLAGS
  preemption = preemption_lib.Preemption()
  # Evaluation holds nothing unsaved: a notice ends it at once.
  with preemption.exits_at_once("evaluating"):
    results = run(Options(**{field.name: given[field.name].value
                             for field in dataclasses.fields(Options)}))
  preemption.close()
  if jax.process_index() == 0:
    print(eval_results.summary(results))


def cli() -> None:
  """`python -m md4.evaluate`: flags defined here, so that importing this module defines none."""
  define_flags()
  errors.run(main)


if __name__ == "__main__":
  cli()
