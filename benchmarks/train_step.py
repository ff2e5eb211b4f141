"""Training-step throughput for a config, as one JSON object.

python benchmarks/train_step.py --config=configs/text8.py \
    --config.model.width=256 --config.model.num_layers=4 --config.model.num_heads=8 \
    --config.batch_size=16

Reports tokens/s, seconds per step, parameter count, FLOPs per token (XLA's
count of the step before compilation, and the model FLOPs: 6 x the per-token
weights plus attention), matmul peaks measured in the same run (f32, and the compute dtype),
the fraction of the f32 peak the step reaches, model-FLOPs utilisation (MFU)
against the measured compute-dtype peak and, given --peak_tflops, against a
datasheet peak, and memory.

The steps are timed in --rounds rounds, each right after its own peak
measurement, and every figure is the median over rounds: on a shared machine
the speed of both drifts together.
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

from md4.runtime import compilation_cache
from md4 import data as data_lib
from md4 import models
from md4.runtime import sharding
from md4 import trainer as trainer_lib
from md4.networks import kernels

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps, split evenly over the rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds of (peak measurement, timed steps).")
_SYNTHETIC = flags.DEFINE_bool(
    "synthetic_batches", True, "Random token batches instead of the config's dataset, so "
    "that the step alone is timed (and text8 need not be present).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 27, "Vocabulary of the random batches.")
_EXAMPLE_SHAPE = flags.DEFINE_list("example_shape", None, "Shape of one random example, "
                                   "e.g. 32,32,3 for images; default: (seq_len,).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Writes a profiler trace of three "
                                   "more steps there (view with TensorBoard's profile tab).")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Datasheet peak of the device in the "
                                  "compute dtype (989 for an H100 SXM in dense bf16), for MFU.")

# Per-sequence weights (time and class conditioning, adaLN) and embedding tables
# (lookups) do no per-token matmul work.
_NOT_PER_TOKEN = ("adaln", "condition/", "embedding/")


def matmul_peak_flops(dtype: jnp.dtype, size: int, repeats: int = 10) -> float:
  """Measured FLOP/s of a square [size, size] matmul on random data, on the default device."""
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a, b)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def model_flops_per_token(config, params, vocab_size: int) -> float:
  """6 x per-token weights (fwd + bwd) + 12 layers L d for attention scores and values.

  The output kernel counts vocab_size columns, not its padded width.
  """
  per_token_weights = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path, simple=True, separator="/") + "/"
    if name.endswith("output/kernel/"):
      per_token_weights += x.shape[0] * vocab_size
    elif not any(part in name for part in _NOT_PER_TOKEN):
      per_token_weights += x.size
  model = config.model
  return 6 * per_token_weights + 12 * model.num_layers * config.seq_len * model.width


def main(argv):
  del argv
  config = _CONFIG.value
  compilation_cache.enable(config)
  mesh = sharding.make_mesh(config)
  if _SYNTHETIC.value:
    example_shape = tuple(map(int, _EXAMPLE_SHAPE.value or [config.seq_len]))
    vocab_size, num_classes = _VOCAB_SIZE.value, 0
  else:
    dataset = data_lib.create(config)
    vocab_size, example_shape, num_classes = (dataset.vocab_size, dataset.example_shape,
                                              dataset.num_classes)
  model = models.create(config, vocab_size, example_shape, num_classes)
  trainer = trainer_lib.compile_steps(config, model, mesh)
  state = trainer.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(
      {"x": rng.integers(0, vocab_size, (config.batch_size, *example_shape), dtype=np.int32)},
      trainer.batch_sharding)

  start = time.perf_counter()
  lowered = trainer.train_step.lower(state, batch, jax.random.PRNGKey(1))
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  # Counted before compilation: XLA:GPU's count of the compiled step leaves out the
  # matmuls it hands to cuBLAS (text8 on an H100: 1.3 MFLOPs per token, not 708).
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan")))

  # Large enough to reach the device's peak, small enough to measure quickly on a CPU.
  peak_size = 2048 if jax.default_backend() == "cpu" else 8192
  compute_dtype = jnp.dtype(config.model.dtype)
  state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
  jax.block_until_ready(metrics)
  steps_per_round = max(1, _STEPS.value // _ROUNDS.value)
  rounds = []  # (seconds per step, f32 peak, compute-dtype peak)
  for _ in range(_ROUNDS.value):
    peak_f32 = matmul_peak_flops(jnp.float32, peak_size) * jax.device_count()
    peak_compute = (peak_f32 if compute_dtype == jnp.float32 else
                    matmul_peak_flops(compute_dtype, peak_size) * jax.device_count())
    start = time.perf_counter()
    for _ in range(steps_per_round):
      state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
    jax.block_until_ready(metrics)
    rounds.append(((time.perf_counter() - start) / steps_per_round, peak_f32, peak_compute))
  seconds_per_step, peak_f32, peak_compute = np.median(rounds, axis=0)
  if _PROFILE_DIR.value:
    with jax.profiler.trace(_PROFILE_DIR.value):
      for _ in range(3):
        state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
      jax.block_until_ready(metrics)

  params = state.params["network"]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tokens_per_step = config.batch_size * math.prod(example_shape)
  tokens_per_sec = tokens_per_step / seconds_per_step
  xla_flops_per_token = xla_flops / tokens_per_step
  flops_per_token = model_flops_per_token(config, params, vocab_size)
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
      "attention_impl": kernels.attention_kernel(
          config.model.attention_impl, compute_dtype,
          config.model.width // config.model.num_heads),
      "seconds_per_step": seconds_per_step,
      "compile_seconds": compile_seconds,
      "examples_per_sec": config.batch_size / seconds_per_step,
      "tokens_per_sec": tokens_per_sec,
      "flops_per_token_xla": xla_flops_per_token,
      "flops_per_token_model": flops_per_token,
      "matmul_peak_flops": peak_f32,
      "matmul_peak_flops_compute_dtype": peak_compute,
      "fraction_of_matmul_peak": np.median(
          [xla_flops / step / peak for step, peak, _ in rounds]),
      "mfu_of_measured_peak": np.median(
          [flops_per_token * tokens_per_step / step / peak for step, _, peak in rounds]),
      "rounds": len(rounds),
      "mfu": (flops_per_token * tokens_per_sec / (_PEAK_TFLOPS.value * 1e12 * jax.device_count())
              if _PEAK_TFLOPS.value else None),
      "peak_memory_bytes": memory.get("peak_bytes_in_use"),
      # From the compiled step: what it holds at once on one device (any backend).
      "step_memory_bytes": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes),
  }))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
