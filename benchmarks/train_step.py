"""Training-step throughput for a config, as one JSON object.

python benchmarks/train_step.py --config=configs/text8.py \
    --config.model.width=256 --config.model.num_layers=4 --config.model.num_heads=8 \
    --config.batch_size=16

Reports tokens/s, seconds per step, parameter count, FLOPs per token (the
compiled step's own count and the 6N + attention estimate), the fraction of
an f32 matmul peak measured in the same run, and peak device memory.
"""

import json
import math
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from md4 import data as data_lib
from md4 import models
from md4 import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_SYNTHETIC = flags.DEFINE_bool(
    "synthetic_batches", True, "Random token batches instead of the config's dataset, so "
    "that the step alone is timed (and text8 need not be present).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 27, "Vocabulary of the random batches.")
_EXAMPLE_SHAPE = flags.DEFINE_list("example_shape", None, "Shape of one random example, "
                                   "e.g. 32,32,3 for images; default: (seq_len,).")


def matmul_peak_flops(dtype=jnp.float32, size: int = 2048, repeats: int = 10) -> float:
  """Measured FLOP/s of a large square matmul on the default device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a, a)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def analytic_flops_per_token(config, num_params_dense: int) -> float:
  """6 N (dense weights) + 12 layers L d (attention scores and values), fwd + bwd."""
  model = config.model
  return 6 * num_params_dense + 12 * model.num_layers * config.seq_len * model.width


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = train.make_mesh(config)
  if _SYNTHETIC.value:
    example_shape = tuple(map(int, _EXAMPLE_SHAPE.value or [config.seq_len]))
    vocab_size, num_classes = _VOCAB_SIZE.value, 0
  else:
    dataset = data_lib.create(config)
    vocab_size, example_shape, num_classes = (dataset.vocab_size, dataset.example_shape,
                                              dataset.num_classes)
  model = models.create(config, vocab_size, example_shape, num_classes)
  trainer = train.build_trainer(config, model, mesh)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = train.global_batch(
      {"x": rng.integers(0, vocab_size, (config.batch_size, *example_shape), dtype=np.int32)},
      trainer.batch_sharding)

  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch, jax.random.PRNGKey(1)).compile()
  compile_seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan")))

  state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
  jax.block_until_ready(metrics)
  seconds_per_step = (time.perf_counter() - start) / _STEPS.value

  params = state.params["network"]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  embedding_params = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                         if "embed" in jax.tree_util.keystr(path) and "project" not in
                         jax.tree_util.keystr(path))
  tokens_per_step = config.batch_size * math.prod(example_shape)
  xla_flops_per_token = xla_flops / tokens_per_step
  peak = matmul_peak_flops() * jax.device_count()
  memory = jax.devices()[0].memory_stats() or {}
  analysis = compiled.memory_analysis()
  print(json.dumps({
      "model_type": config.model_type,
      "device": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
      "parameters": int(num_params),
      "batch_size": config.batch_size,
      "example_shape": example_shape,
      "dtype": config.model.dtype,
      "seconds_per_step": seconds_per_step,
      "compile_seconds": compile_seconds,
      "examples_per_sec": config.batch_size / seconds_per_step,
      "tokens_per_sec": tokens_per_step / seconds_per_step,
      "flops_per_token_xla": xla_flops_per_token,
      "flops_per_token_6n": analytic_flops_per_token(config, num_params - embedding_params),
      "matmul_peak_flops": peak,
      "fraction_of_matmul_peak": xla_flops_per_token * tokens_per_step / seconds_per_step / peak,
      "peak_memory_bytes": memory.get("peak_bytes_in_use"),
      # From the compiled step: what it holds at once on one device (any backend).
      "step_memory_bytes": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes),
  }))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
