"""train_and_evaluate: the training loop, which only glues.

`models` turns parameters into losses and samples, `data` yields batches,
`sharding` lays them and the state over the devices, `checkpointing` keeps
the train state and the data position, `likelihood` estimates the held-out
bound.
"""

import dataclasses
import functools
import signal
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from md4 import checkpointing
from md4 import data as data_lib
from md4 import defaults
from md4 import likelihood
from md4 import metric_writers
from md4 import models
from md4 import sample_quality
from md4 import samples as samples_lib
from md4 import sharding as sharding_lib

Array = jnp.ndarray
Metrics = dict[str, Array]
TrainState = checkpointing.TrainState


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
  opt = config.optimizer
  warmup = min(opt.warmup_steps, config.num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1),
      end_value=opt.learning_rate * opt.min_lr_ratio)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay))


def tree_norm(tree: Any) -> Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_step(model: models.Model, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, state: TrainState,
               batch: dict[str, Array], rng: Array) -> tuple[TrainState, Metrics]:
  """One optimizer step over config.grad_accum_steps micro-batches."""
  rng = jax.random.fold_in(rng, state.step)
  num_micro = config.grad_accum_steps
  micro_batches = jax.tree.map(
      lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch)

  def objective(params, micro_batch, micro_rng):
    output = model.loss(params, micro_batch, micro_rng, True)
    return output.objective.mean() / model.num_tokens, output

  def micro_step(grads_sum, inputs):
    micro_batch, micro_rng = inputs
    (loss, output), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, micro_batch, micro_rng)
    metrics = {"loss": loss, **output.metrics}
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, metrics = jax.lax.scan(micro_step, zeros,
                                (micro_batches, jax.random.split(rng, num_micro)))
  grads = jax.tree.map(lambda g: g / num_micro, grads)
  metrics = jax.tree.map(jnp.mean, metrics)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optax.incremental_update(params, state.ema_params, 1.0 - config.ema_rate)
  metrics.update(grad_norm=optax.tree.norm(grads), param_norm=tree_norm(params),
                 learning_rate=learning_rate_schedule(config)(state.step))
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params)
  return new_state, metrics


@dataclasses.dataclass
class Trainer:
  """Compiled steps and the shardings they use."""

  model: models.Model
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any
  train_step: Any
  eval_step: Any
  sample: Any


def build_trainer(config: ml_collections.ConfigDict, model: models.Model,
                  mesh: jax.sharding.Mesh) -> Trainer:
  tx = create_optimizer(config)

  def init_state(rng: Array) -> TrainState:
    params = model.init(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params)

  state_sharding = sharding_lib.tree_sharding(config, mesh,
                                              jax.eval_shape(init_state, jax.random.PRNGKey(0)))
  data_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_sharding)
  step = jax.jit(functools.partial(train_step, model, tx, config),
                 in_shardings=(state_sharding, data_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  evaluate_step = likelihood.compile_eval_step(model, mesh, state_sharding.ema_params,
                                               config.eval_num_t)
  sample = jax.jit(functools.partial(sample_from_config, model, config),
                   static_argnums=(2, 3), in_shardings=(state_sharding.ema_params, replicated),
                   out_shardings=replicated)
  return Trainer(model, mesh, state_sharding, data_sharding, init, step, evaluate_step, sample)


def sample_from_config(model: models.Model, config: ml_collections.ConfigDict, params: Any,
                       rng: Array, num_samples: int, num_frames: int) -> models.Samples:
  """model.sample with the config's sampler settings."""
  top_p = config.sample_top_p
  name, options = models.configured_sampler(config)
  return model.sample(params, rng, num_samples, steps=config.sample_steps,
                      grid=config.sample_grid, top_p=None if top_p >= 1.0 else top_p,
                      num_frames=num_frames if name == "ancestral" else 0,
                      guidance_scale=config.guidance_scale, sampler=name, **options)


def evaluate(config: ml_collections.ConfigDict, trainer: Trainer, params: Any,
             dataset: data_lib.Dataset, rng_seed: int) -> dict[str, float]:
  """Mean held-out NELBO in bits per token over the split (or num_eval_steps batches).

  Each sequence's estimate averages config.eval_num_t stratified times.
  """
  nats = likelihood.nelbo_per_sequence(
      trainer.eval_step, params, dataset.eval_batches(), trainer.batch_sharding,
      num_batches=config.num_eval_steps, seed=rng_seed)
  summary = likelihood.summarise(nats, trainer.model.num_tokens)
  result = {"eval_bits_per_token": summary["bits_per_token"],
            "eval_bits_per_token_stderr": summary["bits_per_token_stderr"],
            "eval_examples": summary["num_sequences"]}
  if dataset.entropy_bits_per_token is not None:
    result["data_entropy_bits_per_token"] = dataset.entropy_bits_per_token
  return result


def write_samples(config: ml_collections.ConfigDict, trainer: Trainer, params: Any,
                  dataset: data_lib.Dataset, workdir: epath.Path, step: int,
                  rng: Array) -> None:
  """Samples from params to workdir/samples/step_<N>.* (md4.samples)."""
  with_frames = dataset.modality == "image" and "frames" in trainer.model.supports
  num_frames = config.num_montage_frames if with_frames else 0
  drawn = trainer.sample(params, rng, config.num_samples, num_frames)
  tokens = np.asarray(multihost_utils.process_allgather(drawn.tokens, tiled=True))
  if jax.process_index() == 0:
    frames = None if drawn.frames is None else np.asarray(drawn.frames)
    samples_lib.write(workdir / "samples", f"step_{step}", tokens, dataset, frames)


def sample_scores(config: ml_collections.ConfigDict, trainer: Trainer, params: Any,
                  dataset: data_lib.Dataset, rng: Array) -> dict[str, float]:
  """md4.sample_quality's scores of config.num_quality_samples samples, keys prefixed "sample_"."""
  drawn = trainer.sample(params, rng, config.num_quality_samples, 0)
  tokens = np.asarray(multihost_utils.process_allgather(drawn.tokens, tiled=True))
  scores = sample_quality.scores(tokens, dataset, config.seed)
  return {f"sample_{name}": float(value) for name, value in scores.items()}


def summary_line(eval_metrics: dict[str, float]) -> str:
  """The end of a run: the held-out bound, the true entropy and the samples' scores when known."""
  line = f"held-out NELBO: {eval_metrics['eval_bits_per_token']:.4f} bits per token"
  entropy = eval_metrics.get("data_entropy_bits_per_token")
  if entropy is not None:
    line += (f"; source entropy: {entropy:.4f} bits per token "
             f"(gap {eval_metrics['eval_bits_per_token'] - entropy:+.4f})")
  scores = {name[len("sample_"):]: value for name, value in eval_metrics.items()
            if name.startswith("sample_")}
  if scores:
    line += "\n" + sample_quality.describe(scores)
  return line


def check_finite(history: list[tuple[int, Metrics]]) -> None:
  """Raises FloatingPointError at the first step whose metrics are not finite."""
  for step, metrics in history:
    for name in sorted(metrics, key=lambda name: name != "loss"):  # Loss is the likeliest culprit.
      value = metrics[name]
      if not np.isfinite(np.asarray(value)).all():
        raise FloatingPointError(
            f"step {step}: {name} is {value}; stopping (config.check_nans). The last "
            "checkpoint saved before it is intact: lower the learning rate or fix the data "
            "and re-run to resume from it.")


class Preemption:
  """Whether to checkpoint and exit now because of a preemption notice (SIGTERM).

  One process: a SIGTERM handler sets a flag the loop checks. Several
  processes: JAX's preemption sync manager (started by jax.distributed)
  receives the notice and makes every process stop at the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
    self.requested = True

  def reached(self, checkpoints: ocp.CheckpointManager, step: int) -> bool:
    if jax.process_count() > 1:
      self.requested = self.requested or checkpoints.reached_preemption(step)
    return self.requested

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains config's model in workdir, resuming from its latest checkpoint.

  Returns the last evaluation's metrics.
  """
  config = defaults.validate(config)
  workdir = epath.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  mesh = sharding_lib.make_mesh(config)
  dataset = data_lib.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape,
                        dataset.num_classes)
  trainer = build_trainer(config, model, mesh)
  rng_init, rng_train, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed), 3)

  checkpoints = checkpointing.manager(config, workdir)
  state = checkpointing.restore_or_init(checkpoints, trainer.init, trainer.state_sharding,
                                        dataset.train, rng_init)
  step = int(state.step)
  if step == 0:
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
  writer = metric_writers.MetricWriter(workdir, is_main)
  preemption = Preemption()
  history: list[tuple[int, Metrics]] = []
  eval_metrics: dict[str, float] = {}
  last_log_step, last_log_time = step, time.time()
  logging.info("Training %s on %s from step %d to %d on mesh %s", config.model_type,
               config.dataset, step, config.num_train_steps, dict(mesh.shape))

  try:
    while step < config.num_train_steps:
      batch = sharding_lib.global_batch(next(dataset.train), trainer.batch_sharding)
      state, metrics = trainer.train_step(state, batch, rng_train)
      step += 1
      history.append((step, metrics))
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        history = jax.device_get(history)
        if config.check_nans:
          check_finite(history)
        # Throughput of this interval (it includes any eval, sampling or compile in it).
        steps_per_sec = (step - last_log_step) / (time.time() - last_log_time)
        last_log_step, last_log_time = step, time.time()
        means = {k: float(np.mean([m[k] for _, m in history])) for k in history[0][1]}
        writer.write_scalars(step, {**means, "steps_per_sec": steps_per_sec})
        eta = (config.num_train_steps - step) / max(steps_per_sec, 1e-9)
        logging.info("step %d/%d  %.2f steps/s  ETA %s", step, config.num_train_steps,
                     steps_per_sec, time.strftime("%H:%M:%S", time.gmtime(eta)))
        history = []
      if step % config.eval_every_steps == 0 or last:
        eval_metrics = evaluate(config, trainer, state.ema_params, dataset, config.seed)
        if last and config.num_quality_samples and dataset.known_source is not None:
          eval_metrics.update(sample_scores(config, trainer, state.ema_params, dataset,
                                            jax.random.split(rng_sample)[0]))
        writer.write_scalars(step, eval_metrics)
      if step % config.sample_every_steps == 0 or last:
        write_samples(config, trainer, state.ema_params, dataset, workdir, step,
                      jax.random.fold_in(rng_sample, step))
      preempted = preemption.reached(checkpoints, step)
      if step % config.checkpoint_every_steps == 0 or last or preempted:
        if config.check_nans and history:
          check_finite(jax.device_get(history))
        checkpointing.save(checkpoints, state, dataset.train)
      if preempted:
        with checkpointing.saving_errors(checkpoints, step):
          checkpoints.wait_until_finished()
        raise SystemExit(f"Preempted at step {step}: checkpoint saved in "
                         f"{checkpoints.directory}; re-run the same command to resume.")
  finally:
    with checkpointing.saving_errors(checkpoints, step):
      checkpoints.wait_until_finished()
    checkpoints.close()
    writer.close()
    preemption.restore()
  return eval_metrics
