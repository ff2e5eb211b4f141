"""md4 against google-deepmind/md4 at matched settings, on identical batches, as one JSON object.

python benchmarks/vs_reference.py --reference=/path/to/google-deepmind/md4 --seeds=8 \
    --source=markov --output=benchmarks/results/vs_reference_markov.json

For each seed, md4 (its own train step: `md4.trainer.compile_steps`, the
defaults of md4/defaults.py plus the matched settings below) and the
reference's MD4 (its transformer, adaLN-zero, swiglu, depth_scaled_init,
linear schedule, continuous time, antithetic times; trained as its train.py
does: Adam on its bits-per-token loss, no clipping, its warm-up and cosine
schedule, its EMA) train on the same batches. Matched settings: width 128,
2 layers, 4 heads, MLP hidden 352, conditioning width 32, batch 32 of 64
tokens, learning rate 2e-3, 50 warm-up steps, cosine to 0 over 1000 steps,
b2 0.99, EMA 0.99. Every --eval_every steps both EMA parameters are scored by
one estimator with the same draws: --eval_times stratified times per held-out
sequence (u + k / K mod 1) and the same masks.

--md4 adds md4 variants, each a comma-separated list of config overrides
("model.embed_init=reference,optimizer.grad_clip_norm=1e9"; "defaults" is
none), one factor at a time against the same reference run. An item
"code.NAME" swaps a piece of md4's code for the reference's while that
variant traces (CODE_VARIANTS: "code.sinusoid", the reference's time
frequencies; "code.layer_norm_epsilon", its LayerNorm epsilon 1e-5). The
implementations train in alternating chunks of --eval_every steps, each
chunk timed: tokens per second are measured alternately in one process, and
the curves carry wall seconds, from which the bits per token each reaches at
equal wall-clock are read. For a speed ratio, run on an idle machine.

The reference imports tensorflow_probability, distrax, chex, matplotlib,
seaborn and clu at module level; what is missing here is stood in for by
empty modules (its loss path uses none of them), and its package (also named
md4) is imported beside this one.
"""

import contextlib
import functools
import importlib
import json
import math
import os
import sys
import time
import types
from typing import Any, Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from md4 import data as data_lib
from md4 import defaults
from md4 import diffusion
from md4 import models
from md4 import schedule as schedule_lib
from md4 import trainer as trainer_lib
from md4.networks import layers
from md4.networks import transformer
from md4.runtime import sharding

_REFERENCE = flags.DEFINE_string("reference", None, "A checkout of google-deepmind/md4.",
                                 required=True)
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds first_seed .. first_seed + N - 1 (init, data "
                              "order, time draws).")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "The first seed.")
_SOURCE = flags.DEFINE_enum("source", "markov", ["markov", "shakespeare"],
                            "The synthetic order-1 Markov source of configs/quickstart.py, "
                            "or characters of the bundled Tiny Shakespeare.")
_MD4 = flags.DEFINE_multi_string("md4", ["defaults"], "md4 variants: comma-separated config "
                                 "overrides, or 'defaults'.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps (the cosine ends there).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 250, "Steps between held-out scores.")
_EVAL_SEQUENCES = flags.DEFINE_integer("eval_sequences", 64, "Held-out sequences scored.")
_EVAL_TIMES = flags.DEFINE_integer("eval_times", 16, "Stratified times per sequence.")
_WIDTH = flags.DEFINE_integer("width", 128, "Model width (both).")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Blocks (both).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Heads; the conditioning width is width / heads "
                                  "(the reference's feature_dim).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON object to this file.")

LEARNING_RATE, WARMUP_STEPS, B2, EMA_RATE = 2e-3, 50, 0.99, 0.99
# What the reference's modules import at load time but its loss path never calls.
STAND_INS = ("tensorflow_probability", "tensorflow_probability.substrates",
             "tensorflow_probability.substrates.jax", "distrax", "chex", "matplotlib",
             "matplotlib.pyplot", "seaborn", "clu", "clu.platform")


class _StandIn(types.ModuleType):
  """A module whose every attribute is an empty class (a base class or annotation)."""

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return type(name, (), {})


@contextlib.contextmanager
def _reference_importable(path: str):
  """Makes `import md4...` load the reference at path; restores this md4 afterwards."""
  ours = {name: module for name, module in sys.modules.items()
          if name == "md4" or name.startswith("md4.")}
  for name in ours:
    del sys.modules[name]
  for name in STAND_INS:
    try:
      importlib.import_module(name)
    except ImportError:
      sys.modules[name] = _StandIn(name)
      parent, _, child = name.rpartition(".")
      if parent:
        setattr(sys.modules[parent], child, sys.modules[name])
  sys.path.insert(0, path)
  try:
    yield
  finally:
    sys.path.remove(path)
    for name in [n for n in sys.modules if n == "md4" or n.startswith("md4.")]:
      del sys.modules[name]
    sys.modules.update(ours)


def load_reference(path: str) -> types.ModuleType:
  """The reference's md4.models.diffusion.md4 module."""
  with _reference_importable(path):
    return importlib.import_module("md4.models.diffusion.md4")


def md4_config(source: str, seed: int, overrides: str) -> ml_collections.ConfigDict:
  """md4's defaults at the matched settings, then the variant's overrides."""
  config = defaults.get_config()
  if source == "markov":
    config.dataset, config.synthetic.kind = "synthetic", "markov"
  else:
    config.dataset = "chars"  # chars.path "" is the bundled Tiny Shakespeare.
  config.seed = seed
  config.seq_len = _SEQ_LEN.value
  config.batch_size = _BATCH_SIZE.value
  config.num_train_steps = _STEPS.value
  config.model.update(width=_WIDTH.value, num_layers=_NUM_LAYERS.value,
                      num_heads=_NUM_HEADS.value, cond_dim=_WIDTH.value // _NUM_HEADS.value,
                      mlp_ratio=8 / 3, mlp_multiple_of=32)
  config.optimizer.update(learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, b2=B2)
  config.ema_rate = EMA_RATE
  if overrides != "defaults":
    for item in [i for i in overrides.split(",") if not i.startswith("code.")]:
      key, value = item.split("=")
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      default = node[leaf]
      node[leaf] = (value.lower() == "true" if isinstance(default, bool) else
                    type(default)(value))
  return defaults.validate(config)


Array = jnp.ndarray


def reference_timestep_embedding(t: Array, dim: int, scale: float = 1000.0,
                                 max_period: float = 10_000.0) -> Array:
  """The reference's get_timestep_embedding [B, dim]: frequencies over half - 1, not half."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  angles = scale * t.astype(jnp.float32)[:, None] * freqs[None, :]
  features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(features, ((0, 0), (0, dim - 2 * half)))


# Pieces of md4's code swapped for the reference's ("code.NAME" in a --md4 variant) while
# that variant runs: name -> (module, attribute, the reference's version).
CODE_VARIANTS = {
    "sinusoid": (layers, "timestep_embedding", reference_timestep_embedding),
    "layer_norm_epsilon": (nn, "LayerNorm", functools.partial(nn.LayerNorm, epsilon=1e-5)),
}


@contextlib.contextmanager
def code_swapped(names: list[str]):
  """CODE_VARIANTS[name] for each name in place; the originals back afterwards."""
  originals = [(module, attribute, getattr(module, attribute))
               for module, attribute, _ in (CODE_VARIANTS[n] for n in names)]
  for name in names:
    module, attribute, replacement = CODE_VARIANTS[name]
    setattr(module, attribute, replacement)
  try:
    yield
  finally:
    for module, attribute, original in originals:
      setattr(module, attribute, original)


class Implementation:
  """One network and its training: init(seed) -> state, a compiled step, and a compiled scorer.

  step(state, batch, seed) -> state; score(state, x [n, L], rng) -> bits per token [n]; each
  runs with the code of CODE_VARIANTS[name] for name in code swapped in.
  """

  def __init__(self, init: Callable, step: Callable, predict: Callable, vocab_size: int,
               code: tuple[str, ...] = ()):
    self._init, self._step, self.code = init, step, list(code)
    self._score = jax.jit(lambda state, x, rng: held_out_bits(predict(state), x, rng,
                                                              vocab_size, _EVAL_TIMES.value))

  def init(self, seed: int) -> Any:
    with code_swapped(self.code):
      return self._init(seed)

  def step(self, state: Any, batch: dict[str, np.ndarray], seed: int) -> Any:
    with code_swapped(self.code):
      return self._step(state, batch, seed)

  def score(self, state: Any, x: Array, rng: Array) -> Array:
    with code_swapped(self.code):
      return self._score(state, x, rng)


def md4_implementation(config: ml_collections.ConfigDict, vocab_size: int,
                       code: tuple[str, ...] = ()) -> Implementation:
  """md4's own train step; the seed picks the init and the time and mask draws as train.py does.

  code: names in CODE_VARIANTS, swapped in whenever the step or the scorer runs.
  """
  model = models.create(config, vocab_size, (config.seq_len,))
  trainer = trainer_lib.compile_steps(config, model, sharding.make_mesh(config))

  def step(state, batch, seed):
    rng_train = jax.random.split(jax.random.PRNGKey(seed), 3)[1]
    return trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding),
                              rng_train)[0]

  def init(seed):
    return trainer.init(jax.random.split(jax.random.PRNGKey(seed), 3)[0])

  return Implementation(init, step, lambda state: model.predict_fn(state.ema_params),
                        vocab_size, code)


def reference_learning_rate(step: Array) -> Array:
  """The reference's get_learning_rate: linear warm-up times a cosine from the warm-up's end."""
  warmup = jnp.minimum(1.0, step / WARMUP_STEPS)
  ratio = jnp.maximum(0.0, (step - WARMUP_STEPS) / (_STEPS.value - WARMUP_STEPS))
  return LEARNING_RATE * 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * warmup


def reference_implementation(module: types.ModuleType, vocab_size: int) -> Implementation:
  """The reference's MD4 trained as its train.py trains it (loss in bits per token)."""
  model = module.MD4(
      (_SEQ_LEN.value,), cont_time=True, feature_dim=_WIDTH.value // _NUM_HEADS.value,
      num_heads=_NUM_HEADS.value, n_layers=_NUM_LAYERS.value, vocab_size=vocab_size,
      noise_schedule_type="linear", mlp_type="swiglu", depth_scaled_init=True,
      cond_type="adaln_zero", outside_embed=False, classes=0, antithetic_time_sampling=True)
  optimizer = optax.chain(optax.identity(), optax.adamw(reference_learning_rate, b1=0.9,
                                                       b2=B2, weight_decay=0.0))
  x0 = jnp.zeros((1, _SEQ_LEN.value), jnp.int32)

  def init(seed):
    rng_init = jax.random.split(jax.random.PRNGKey(seed), 3)[0]
    params = jax.jit(model.init)({"params": rng_init, "sample": rng_init}, x0)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": optimizer.init(params), "ema_params": jax.tree.map(jnp.copy, params)}

  def train_step(state, x, seed):
    rng_train = jax.random.split(jax.random.PRNGKey(seed), 3)[1]
    rng = jax.random.fold_in(rng_train, state["step"])

    def loss(params):
      return model.apply({"params": params}, x, train=True, rngs={"sample": rng})["loss"]

    grads = jax.grad(loss)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: e + (1.0 - EMA_RATE) * (p - e), state["ema_params"], params)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "ema_params": ema}

  compiled = jax.jit(train_step, donate_argnums=(0,))

  def predict(state):
    def predict_fn(z, t):
      return model.apply({"params": state["ema_params"]}, z, t,
                         method=lambda m, z, t: m.predict_x(z, t)[0])
    return predict_fn

  return Implementation(init, lambda state, batch, seed: compiled(state, batch["x"], seed),
                        predict, vocab_size)


def held_out_bits(predict_fn: Callable, x: Array, rng: Array, vocab_size: int,
                  num_times: int) -> Array:
  """Bits per token [n] of each held-out sequence x [n, L]: the NELBO at num_times stratified times.

  Times (u_i + k / K) mod 1 and the masks depend on rng only, so two networks
  scored with the same rng see the same draws.
  """
  schedule = schedule_lib.get("linear")
  rng_t, rng_mask = jax.random.split(rng)
  n, length = x.shape
  t = ((jax.random.uniform(rng_t, (n, 1)) + jnp.arange(num_times) / num_times) % 1.0).reshape(-1)
  repeated = jnp.repeat(x, num_times, axis=0)
  z = diffusion.mask_tokens(rng_mask, repeated, schedule.alpha(t), vocab_size)
  nelbo, _ = diffusion.loss_given_state(predict_fn, repeated, z, t, schedule=schedule,
                                        vocab_size=vocab_size)
  return nelbo.reshape(n, num_times).mean(axis=1) / (length * math.log(2))


def score(implementation: Implementation, state: Any, x: np.ndarray, rng: Array) -> np.ndarray:
  """Bits per token [N] of x [N, L], 16 sequences per call, the draws fixed by rng."""
  chunk = 16
  return np.concatenate([np.asarray(implementation.score(state, x[i:i + chunk],
                                                         jax.random.fold_in(rng, i)))
                         for i in range(0, len(x), chunk)])


def mean_se(values) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def run_seed(seed: int, implementations: dict[str, Implementation]) -> dict[str, Any]:
  """Trains every implementation on the seed's batches; their curves, timings and scores."""
  dataset = data_lib.create(md4_config(_SOURCE.value, seed, "defaults"))
  batches = [next(dataset.train) for _ in range(_STEPS.value)]
  held_out = np.concatenate([b["x"] for b in dataset.eval_batches()])[:_EVAL_SEQUENCES.value]
  eval_rng = jax.random.PRNGKey(10_000 + seed)
  states, results = {}, {}
  for name, implementation in implementations.items():
    state = implementation.init(seed)
    start = time.perf_counter()
    state = implementation.step(state, batches[0], seed)  # Compiles on the first seed.
    jax.block_until_ready(state)
    states[name] = state
    results[name] = {"first_step_seconds": round(time.perf_counter() - start, 3),
                     "curve": [], "tokens_per_sec": [], "train_seconds": 0.0}
  tokens_per_step = _BATCH_SIZE.value * _SEQ_LEN.value
  finals = {}
  for begin in range(1, _STEPS.value, _EVAL_EVERY.value):
    end = min(_STEPS.value, begin - 1 + _EVAL_EVERY.value)
    for name, implementation in implementations.items():  # Alternating chunks.
      state = states[name]
      start = time.perf_counter()
      for step in range(begin, end):
        state = implementation.step(state, batches[step], seed)
      jax.block_until_ready(state)
      seconds = time.perf_counter() - start
      states[name] = state
      result = results[name]
      result["train_seconds"] += seconds
      result["tokens_per_sec"].append(round(tokens_per_step * (end - begin) / seconds, 1))
      bits = score(implementation, state, held_out, eval_rng)
      finals[name] = bits
      result["curve"].append([end, *mean_se(bits), round(result["train_seconds"], 2)])
  for name, result in results.items():
    result["bits_per_token"], result["stderr"] = mean_se(finals[name])
    if name != "reference":
      result["paired_difference"] = mean_se(finals[name] - finals["reference"])
  return {"seed": seed, **results}


def at_wall_clock(curve: list[list[float]], seconds: float) -> float:
  """Bits per token at `seconds` of training, linear between scored points."""
  times = [point[3] for point in curve]
  return float(np.interp(seconds, times, [point[1] for point in curve]))


def summarise(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
  summary = {}
  for name in names:
    entry = {"bits_per_token": mean_se([run[name]["bits_per_token"] for run in runs]),
             "tokens_per_sec_median": float(np.median(
                 [v for run in runs for v in run[name]["tokens_per_sec"]]))}
    if name != "reference":
      entry["paired_difference"] = mean_se(
          [run[name]["bits_per_token"] - run["reference"]["bits_per_token"] for run in runs])
      ratios = [a / b for run in runs for a, b in zip(run[name]["tokens_per_sec"],
                                                      run["reference"]["tokens_per_sec"])]
      entry["speed_ratio_rounds"] = [round(r, 3) for r in ratios]
      equal = []
      for run in runs:
        seconds = min(run[name]["curve"][-1][3], run["reference"]["curve"][-1][3])
        equal.append([seconds, at_wall_clock(run[name]["curve"], seconds),
                      at_wall_clock(run["reference"]["curve"], seconds)])
      entry["equal_wall_clock"] = {
          "seconds": mean_se([e[0] for e in equal]),
          name: mean_se([e[1] for e in equal]), "reference": mean_se([e[2] for e in equal]),
          "paired_difference": mean_se([e[1] - e[2] for e in equal])}
    summary[name] = entry
  return summary


def main(argv):
  del argv
  reference_module = load_reference(_REFERENCE.value)
  config = md4_config(_SOURCE.value, 0, "defaults")
  dataset = data_lib.create(config)
  implementations = {
      ("md4" if v == "defaults" else f"md4 {v}"):
      md4_implementation(md4_config(_SOURCE.value, 0, v), dataset.vocab_size,
                         tuple(i[len("code."):] for i in v.split(",") if i.startswith("code.")))
      for v in _MD4.value}
  implementations["reference"] = reference_implementation(reference_module, dataset.vocab_size)
  runs = []
  for seed in range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value):
    runs.append(run_seed(seed, implementations))
    print(json.dumps({"seed": seed, **{name: [value["bits_per_token"], value["stderr"]]
                                       for name, value in runs[-1].items() if name != "seed"}}),
          file=sys.stderr, flush=True)
    # Written after every seed, so that a run cut short leaves the seeds it finished.
    result = {
        "command": "python benchmarks/vs_reference.py " + " ".join(sys.argv[1:]),
        "source": _SOURCE.value,
        "entropy_bits_per_token": dataset.entropy_bits_per_token,
        "settings": settings(),
        "machine": {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "cpus_in_affinity": len(os.sched_getaffinity(0)),
                    "load_average": os.getloadavg()},
        "seeds": len(runs),
        "summary": summarise(runs, list(implementations)),
        "runs": runs,
    }
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result, indent=1))


def settings() -> dict[str, Any]:
  return {"width": _WIDTH.value, "num_layers": _NUM_LAYERS.value, "num_heads": _NUM_HEADS.value,
          "cond_dim": _WIDTH.value // _NUM_HEADS.value,
          "mlp_hidden": transformer.mlp_hidden_dim(_WIDTH.value, 8 / 3, 32),
          "batch_size": _BATCH_SIZE.value, "seq_len": _SEQ_LEN.value, "steps": _STEPS.value,
          "learning_rate": LEARNING_RATE, "warmup_steps": WARMUP_STEPS, "b2": B2,
          "ema_rate": EMA_RATE, "eval_sequences": _EVAL_SEQUENCES.value,
          "eval_times": _EVAL_TIMES.value}


if __name__ == "__main__":
  app.run(main)
