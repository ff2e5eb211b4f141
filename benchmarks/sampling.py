"""Sampling throughput and the network evaluations output reuse saves, as one JSON object.

python benchmarks/sampling.py --config=configs/quickstart.py --steps=64,256,1024

"speed": for each number of steps, sequences/s of MD4's ancestral sampler
(`md4.samplers.ancestral`) with the config's network, the best of --repeats timed
runs after a compiling one.

"reuse": for MD4 and MDM-Prime (config.prime's codec, `prime.SubTokens`) with
the same network ignoring t (time_conditioning="none", where reuse is
valid), the network evaluations (NFE) spent with output reuse, over
--nfe_seeds seeds, for the whole batch (whose skip is decided jointly) and
for one sequence, and sequences/s with and without reuse. A step can be
skipped only after one that revealed nothing (an idle step); MDM-Prime's
partial masking reveals l L sub-tokens instead of L tokens, so it has fewer
idle steps, and reuse saves it less. Parameters are random: which steps are
idle depends only on the reveal draws, never on the network's values, so a
trained network spends the same NFE.
"""

import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from md4 import models
from md4 import samplers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_STEPS = flags.DEFINE_list("steps", ["64", "256", "1024"], "Sampling steps to time.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Sequences per batch.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 27, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (best is kept).")
_NFE_SEEDS = flags.DEFINE_integer("nfe_seeds", 4, "Seeds over which NFE is measured.")


def build(config, model_type: str, time_conditioning: str):
  """(model, random parameters) for config with the given model type and conditioning."""
  config = config.copy_and_resolve_references()
  config.model_type = model_type
  config.model.time_conditioning = time_conditioning
  model = models.create(config, _VOCAB_SIZE.value, (config.seq_len,))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
  # Random output weights, so that samples are not degenerate.
  params["network"]["output"]["kernel"] = jax.random.normal(
      jax.random.PRNGKey(1), params["network"]["output"]["kernel"].shape)
  return model, params


def sampling_fn(model, steps: int, reuse: bool, num_samples: int):
  """jit of (params, rng) -> (tokens, nfe) of the model's sampler."""
  shape = (num_samples, model.config.seq_len)
  grid = model.config.sample_grid

  def draw(params, rng):
    drawn = samplers.sample("ancestral", model.predict_fn(params), rng, model.space(params),
                            shape=shape, steps=steps, grid=grid, reuse_outputs=reuse)
    return drawn.tokens, drawn.nfe

  return jax.jit(draw)


def sequences_per_sec(draw, params, num_samples: int) -> float:
  """num_samples / the best of --repeats timed calls, after a compiling one."""
  jax.block_until_ready(draw(params, jax.random.PRNGKey(0)))
  seconds = []
  for repeat in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(draw(params, jax.random.PRNGKey(repeat + 1)))
    seconds.append(time.perf_counter() - start)
  return num_samples / min(seconds)


def nfe_over_seeds(draw, params) -> list[int]:
  return [int(draw(params, jax.random.PRNGKey(100 + seed))[1])
          for seed in range(_NFE_SEEDS.value)]


def main(argv):
  del argv
  config, num_samples = _CONFIG.value, _NUM_SAMPLES.value
  steps_list = [int(steps) for steps in _STEPS.value]
  model, params = build(config, "md4", config.model.time_conditioning)
  speed = [{"steps": steps, "time_conditioning": config.model.time_conditioning,
            "sequences_per_sec": sequences_per_sec(sampling_fn(model, steps, False, num_samples),
                                                   params, num_samples)}
           for steps in steps_list]
  reuse = []
  for model_type in ("md4", "prime"):
    model, params = build(config, model_type, "none")
    for steps in steps_list:
      batch_nfe = nfe_over_seeds(sampling_fn(model, steps, True, num_samples), params)
      sequence_nfe = nfe_over_seeds(sampling_fn(model, steps, True, 1), params)
      reuse.append({
          "model_type": model_type, "steps": steps,
          "nfe_batch": batch_nfe, "nfe_batch_mean": float(np.mean(batch_nfe)),
          "nfe_saved_batch": steps - float(np.mean(batch_nfe)),
          "nfe_sequence": sequence_nfe, "nfe_sequence_mean": float(np.mean(sequence_nfe)),
          "nfe_saved_sequence": steps - float(np.mean(sequence_nfe)),
          **{f"sequences_per_sec_reuse_{flag}".lower(): sequences_per_sec(
              sampling_fn(model, steps, flag, num_samples), params, num_samples)
             for flag in (False, True)}})
  print(json.dumps({"seq_len": config.seq_len,
                    "vocab_size": _VOCAB_SIZE.value, "prime_length": config.prime.length,
                    "num_samples": num_samples, "device": jax.devices()[0].device_kind,
                    "speed": speed, "reuse": reuse}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
