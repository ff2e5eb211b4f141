"""The quick-start model's ancestral samples against the source, by time grid and steps.

python benchmarks/grid_quickstart.py --workdir=/tmp/md4_quickstart --output=benchmarks/results/grid_quickstart.json

Trains configs/quickstart.py in --workdir unless a checkpoint is there,
then draws --num_samples samples with the ancestral sampler on each grid
(uniform, cosine) at steps 8 to 1024 and scores them against the synthetic
source's true law (`md4.sample_quality`): transition KL and log-likelihood
in bits per token, with standard errors. Same seed for every row.
"""

import json
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

import oracle_chain
from md4 import sample_quality
from md4 import sampler

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "Config to train when --workdir has no checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/md4_quickstart", "Training workdir.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1024, "Samples per row.")
_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there.")
STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)


def main(argv):
  del argv
  checkpoint = oracle_chain.quickstart_checkpoint(_CONFIG.value, _WORKDIR.value)
  rows = []
  for grid in sampler.GRIDS:
    for steps in STEPS:
      drawn = checkpoint.model.sample(checkpoint.params, jax.random.PRNGKey(0),
                                      _NUM_SAMPLES.value, steps=steps, grid=grid,
                                      sampler="ancestral")
      scores = sample_quality.scores(np.asarray(drawn.tokens), checkpoint.dataset)
      rows.append({"grid": grid, "steps": steps,
                   **{name: scores[name] for name in ("kl", "kl_stderr", "log_likelihood",
                                                      "log_likelihood_stderr",
                                                      "source_log_likelihood")}})
      print(json.dumps(rows[-1]), flush=True)
  print("\n| grid | " + " | ".join(f"T = {steps}" for steps in STEPS) + " |")
  print("| --- |" + " --- |" * len(STEPS))
  for grid in sampler.GRIDS:
    print(f"| {grid} | " + " | ".join(f"{row['kl']:.3f} ± {row['kl_stderr']:.3f}"
                                       for row in rows if row["grid"] == grid) + " |")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"command": " ".join(["python"] + sys.argv), "step": checkpoint.step,
                 "num_samples": _NUM_SAMPLES.value, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
