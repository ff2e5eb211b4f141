"""Sampling throughput and network evaluations, as one JSON object.

python benchmarks/sampling.py --config=configs/quickstart.py --steps=256,1024

For each number of steps, times MD4's ancestral sampler with and without
output reuse, for a network with the config's time conditioning and for the
same network ignoring t (time_conditioning="none", where reuse is valid),
and reports sequences/s and the network evaluations (NFE) actually spent.
Parameters are random: speed and NFE do not depend on training.
"""

import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from md4 import models
from md4 import sampler

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_STEPS = flags.DEFINE_list("steps", ["256", "1024"], "Sampling steps to time.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Sequences per batch.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 27, "Vocabulary size.")


def time_sampler(model: models.MaskedDiffusion, params, steps: int, reuse: bool,
                 num_samples: int) -> dict[str, float]:
  config = model.config
  shape = (num_samples, config.seq_len)

  @jax.jit
  def draw(params, rng):
    return sampler.ancestral(model.predict_fn(params), rng, shape=shape,
                             vocab_size=model.vocab_size, schedule=model.schedule, steps=steps,
                             grid=config.sample_grid, reuse_outputs=reuse, return_nfe=True)

  jax.block_until_ready(draw(params, jax.random.PRNGKey(0)))
  start = time.perf_counter()
  _, nfe = jax.block_until_ready(draw(params, jax.random.PRNGKey(1)))
  seconds = time.perf_counter() - start
  return {"steps": steps, "reuse_outputs": reuse, "nfe": int(nfe),
          "seconds": seconds, "sequences_per_sec": num_samples / seconds}


def main(argv):
  del argv
  results = []
  for time_conditioning in (_CONFIG.value.model.time_conditioning, "none"):
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.time_conditioning = time_conditioning
    model = models.create(config, _VOCAB_SIZE.value, (config.seq_len,))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
    # Random output weights, so that samples (and hence reuse) are not degenerate.
    params["network"]["output"]["kernel"] = jax.random.normal(
        jax.random.PRNGKey(1), params["network"]["output"]["kernel"].shape)
    for steps in map(int, _STEPS.value):
      for reuse in ((False, True) if time_conditioning == "none" else (False,)):
        results.append({"time_conditioning": time_conditioning,
                        **time_sampler(model, params, steps, reuse, _NUM_SAMPLES.value)})
  print(json.dumps({"seq_len": _CONFIG.value.seq_len, "num_samples": _NUM_SAMPLES.value,
                    "device": jax.devices()[0].device_kind, "results": results}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
