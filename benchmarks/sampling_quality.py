"""Sample quality against the truth for every sampler, as JSON and a Markdown table.

python benchmarks/sampling_quality.py --steps=16,64,256 --workdir=/tmp/md4_quickstart

Trains --config (configs/quickstart.py) in --workdir (default: a new
temporary folder) unless a checkpoint is there, which it then loads, then
draws --num_samples unconditional samples with each sampler at each step
count and scores them against the synthetic source's true law
(`md4.sample_quality`): log-likelihood, entropy rate and transition KL in
bits per token with standard errors, the sample entropy in nats, the
network evaluations (NFE) and the wall time of a second, compiled, call.
The first row scores as many held-out sequences of the source itself: a
perfect sampler of a perfect model scores that (the KL 0 up to its error).
"""

import json
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from md4 import restored
from md4 import sample_quality
from md4 import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "Config to train when --workdir has no checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir; default: a new temporary one.")
_STEPS = flags.DEFINE_list("steps", ["16", "64", "256"], "Step counts of the step samplers.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 512, "Samples per row.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there (with the command), "
                              "e.g. benchmarks/results/sampling_quality.json, which the "
                              "README's table quotes.")

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "sampling_quality.json"

# (label, sampler, options); first-hitting takes no steps (one call per token).
SAMPLERS = (
    ("ancestral", "ancestral", {}),
    ("maskgit", "maskgit", {}),
    ("llada", "llada", {}),
    ("llada, threshold 0.9", "llada", {"threshold": 0.9}),
    ("blocks of 16, llada", "blocks", {"block_size": 16, "order": "confidence"}),
    ("remdm cap 0.04", "remdm", {"strategy": "cap", "eta": 0.04}),
    ("remdm loop 0.02", "remdm", {"strategy": "loop", "eta": 0.02}),
    ("first_hitting", "first_hitting", {}),
)
COLUMNS = ("sampler", "steps", "nfe", "seconds", "log_likelihood", "entropy_rate", "kl",
           "sample_entropy")


def checkpoint_from(workdir: str) -> restored.Checkpoint:
  """The workdir's latest checkpoint, training config there first if it has none."""
  try:
    return restored.restore(workdir)
  except (ValueError, FileNotFoundError):
    train.train_and_evaluate(_CONFIG.value, workdir)
    return restored.restore(workdir)


def draw_and_score(checkpoint: restored.Checkpoint, name: str, options: dict,
                   steps: int) -> dict:
  """One row: scores, NFE and the seconds of a compiled call."""
  model, config = checkpoint.model, checkpoint.config
  num = _NUM_SAMPLES.value
  draw = jax.jit(lambda params, rng: model.sample(
      params, rng, num, steps=steps, grid=config.sample_grid, sampler=name, **options))
  rng = jax.random.PRNGKey(_SEED.value)
  jax.block_until_ready(draw(checkpoint.params, rng))
  start = time.perf_counter()
  drawn = jax.block_until_ready(draw(checkpoint.params, rng))
  seconds = time.perf_counter() - start
  scores = sample_quality.scores(np.asarray(drawn.tokens), checkpoint.dataset, _SEED.value)
  return {"steps": steps, "nfe": int(drawn.nfe), "seconds": seconds, **scores}


def source_row(checkpoint: restored.Checkpoint) -> dict:
  """The scores of --num_samples held-out sequences of the source."""
  tokens = []
  for batch in checkpoint.dataset.eval_batches():
    tokens.append(batch["x"])
    if sum(len(t) for t in tokens) >= _NUM_SAMPLES.value:
      break
  tokens = np.concatenate(tokens)[:_NUM_SAMPLES.value]
  return {"sampler": "source (held-out data)", "steps": None, "nfe": None, "seconds": None,
          **sample_quality.scores(tokens, checkpoint.dataset, _SEED.value)}


def cell(row: dict, column: str) -> str:
  value = row.get(column)
  if value is None:
    return "–"
  if column in ("log_likelihood", "entropy_rate", "kl", "sample_entropy"):
    stderr = row.get(column + "_stderr")
    return f"{value:.3f} ± {stderr:.3f}"
  if column == "seconds":
    return f"{value:.2f}"
  return str(value)


def markdown(rows: list[dict]) -> str:
  header = ["sampler", "steps", "NFE", "wall s", "log-lik (bits/tok)", "entropy rate",
            "transition KL", "sample entropy (nats)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(row, column) for column in COLUMNS) + " |" for row in rows]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="md4_sampling_quality_")
  checkpoint = checkpoint_from(workdir)
  if checkpoint.dataset.known_source is None:
    raise app.UsageError(f"{workdir} holds a model of {checkpoint.config.dataset!r}, "
                         "whose law is unknown: train on the synthetic source")
  rows = [source_row(checkpoint)]
  for label, name, options in SAMPLERS:
    if name not in checkpoint.model.supports:
      continue
    step_counts = [checkpoint.model.num_tokens] if name == "first_hitting" else [
        int(steps) for steps in _STEPS.value]
    for steps in step_counts:
      rows.append({"sampler": label, **draw_and_score(checkpoint, name, options, steps)})
      if name == "first_hitting":
        rows[-1]["steps"] = None
  result = {"workdir": str(checkpoint.workdir), "step": checkpoint.step,
            "model_type": checkpoint.config.model_type, "num_samples": _NUM_SAMPLES.value,
            "source": rows[0], "rows": rows[1:],
            "device": jax.devices()[0].device_kind}
  print(json.dumps(result, indent=1))
  print(markdown(rows))
  if _OUTPUT.value:
    result["command"] = " ".join(["python", *sys.argv])
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
