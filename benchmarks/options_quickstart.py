"""The quick-start model's samples against the source, by sampler option and steps.

python benchmarks/options_quickstart.py --workdir=/tmp/md4_quickstart --output=benchmarks/results/options_quickstart.json

Trains configs/quickstart.py in --workdir unless a checkpoint is there, then
varies every option of maskgit, llada, blocks and remdm in
`oracle_chain.CANDIDATES` alone, the others at their registered defaults:
--num_samples samples per cell on the uniform grid, seed 0, at steps 8 and
32, remdm (whose remasking is meant for many steps) also 128 (more steps
took too long on the shared 2-core machine), scored against the synthetic
source's true law (`md4.sample_quality`): transition KL and log-likelihood
in bits per token with standard errors, and the network calls spent.
"""

import functools

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

import oracle_chain
from md4 import restored
from md4 import sample_quality

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py",
                                          "Config to train when --workdir has no checkpoint.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/md4_quickstart", "Training workdir.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Samples per cell.")
_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there.")
STEPS = (8, 32)


def scores(checkpoint: restored.Checkpoint, sampler: str, options: dict, steps: int) -> dict:
  """The scores of the checkpoint's samples by sampler with options in steps."""
  drawn = checkpoint.model.sample(checkpoint.params, jax.random.PRNGKey(0), _NUM_SAMPLES.value,
                                  steps=steps, grid="uniform", sampler=sampler, **options)
  scored = sample_quality.scores(np.asarray(drawn.tokens), checkpoint.dataset)
  return {"nfe": int(drawn.nfe), **{name: scored[name] for name in (
      "kl", "kl_stderr", "log_likelihood", "log_likelihood_stderr")}}


def main(argv):
  del argv
  checkpoint = oracle_chain.quickstart_checkpoint(_CONFIG.value, _WORKDIR.value)
  rows = oracle_chain.measured(
      "quickstart", lambda sampler: STEPS + ((128,) if sampler == "remdm" else ()),
      functools.partial(scores, checkpoint))
  oracle_chain.report(rows, lambda row: f"{row['kl']:.2f} ± {row['kl_stderr']:.2f}",
                      _OUTPUT.value, step=checkpoint.step, num_samples=_NUM_SAMPLES.value)


if __name__ == "__main__":
  app.run(main)
