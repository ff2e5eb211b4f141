"""train_and_evaluate: mesh, sharded jit steps, evaluation, samples, checkpoints.

The loop only glues: `models` turns parameters into losses and samples,
`data` yields batches, Orbax keeps the train state and the data iterator.
"""

import contextlib
import dataclasses
import functools
import glob
import math
import os
import signal
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from etils import epath
import flax
import flax.linen as nn
import grain
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from md4 import data as data_lib
from md4 import defaults
from md4 import metric_writers
from md4 import models
from md4 import visualize

Array = jnp.ndarray
Metrics = dict[str, Array]


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any


def _on_cloud_tpu_vm() -> bool:
  """TPU VMs expose their chips as /dev/accel* or /dev/vfio/<n>; jax finds the other hosts."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins the other processes of a multi-process run, if this is one.

  Cloud TPU VMs and SLURM jobs are detected; other launchers pass the
  coordinator's host:port, the number of processes and this one's index.
  """
  # CPU-only processes need a collectives backend to talk to each other.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def make_mesh(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A Mesh of the devices (default: all) with config.mesh_axes; a -1 takes the rest."""
  devices = jax.devices() if devices is None else devices
  shape = list(config.mesh_shape)
  num_devices = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh_shape={tuple(shape)} may hold at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh_shape={tuple(config.mesh_shape)} needs {math.prod(shape)} "
                     f"devices, but {num_devices} are present")
  device_grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(device_grid, tuple(config.mesh_axes))


def logical_rules(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[tuple[str, str | None], ...]:
  """config.sharding_rules with mesh axes absent from (or of size 1 in) the mesh dropped."""
  rules = []
  for logical, mesh_axis in config.sharding_rules:
    keep = mesh_axis in mesh.shape and mesh.shape[mesh_axis] > 1
    rules.append((logical, mesh_axis if keep else None))
  return tuple(rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batches split over every data-parallel axis (data and fsdp) present."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))


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


def train_step(model: models.MD4, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, state: TrainState,
               batch: dict[str, Array], rng: Array) -> tuple[TrainState, Metrics]:
  """One optimizer step over config.grad_accum_steps micro-batches."""
  rng = jax.random.fold_in(rng, state.step)
  num_micro = config.grad_accum_steps
  micro_batches = jax.tree.map(
      lambda x: x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), batch)

  def micro_step(grads_sum, inputs):
    micro_batch, micro_rng = inputs
    grad_fn = jax.value_and_grad(model.loss, has_aux=True)
    (objective, aux), grads = grad_fn(state.params, micro_batch, micro_rng, True)
    metrics = {"loss": objective, **{k: v for k, v in aux.items() if jnp.ndim(v) == 0}}
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


def eval_step(model: models.MD4, batch_sharding: jax.sharding.NamedSharding, num_t: int,
              params: Any, batch: dict[str, Array], rng: Array) -> Array:
  """Per-sequence NELBO [B], nats, averaged over num_t times per sequence.

  The batch is tiled num_t times (row k B + j is sequence j), so antithetic
  times over the tiled batch give each sequence one time in each 1/num_t
  stratum: the per-sequence estimates have far less variance than one t.
  """
  tiled = {key: jnp.tile(value, (num_t,) + (1,) * (value.ndim - 1))
           for key, value in batch.items()}
  tiled = jax.lax.with_sharding_constraint(tiled, batch_sharding)
  _, aux = model.loss(params, tiled, rng, False)
  return aux["nelbo"].reshape(num_t, -1).mean(axis=0)


@dataclasses.dataclass
class Trainer:
  """Compiled steps and the shardings they use."""

  model: models.MD4
  mesh: jax.sharding.Mesh
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Any
  train_step: Any
  eval_step: Any
  sample: Any


def build_trainer(config: ml_collections.ConfigDict, model: models.MD4,
                  mesh: jax.sharding.Mesh) -> Trainer:
  tx = create_optimizer(config)

  def init_state(rng: Array) -> TrainState:
    params = model.init(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params)

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  rules = logical_rules(config, mesh)
  state_sharding = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract_state), mesh, rules)
  data_sharding = batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init = jax.jit(lambda rng: nn.meta.unbox(init_state(rng)), out_shardings=state_sharding)
  step = jax.jit(functools.partial(train_step, model, tx, config),
                 in_shardings=(state_sharding, data_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, model, data_sharding, config.eval_num_t),
                     in_shardings=(state_sharding.ema_params, data_sharding, replicated),
                     out_shardings=replicated)
  sample = jax.jit(model.sample, static_argnums=(2, 3),
                   in_shardings=(state_sharding.ema_params, replicated),
                   out_shardings=replicated)
  return Trainer(model, mesh, state_sharding, data_sharding, init, step, evaluate, sample)


def global_batch(batch: dict[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, Array]:
  """Assembles each process's local batch into one global array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(config: ml_collections.ConfigDict, trainer: Trainer, params: Any,
             dataset: data_lib.Dataset, rng: Array) -> dict[str, float]:
  """Mean held-out NELBO in bits per token over the split (or num_eval_steps batches).

  Each sequence's estimate averages config.eval_num_t stratified times; the
  standard error is that of the mean of these independent estimates.
  """
  nelbos = []
  for index, batch in enumerate(dataset.eval_batches()):
    if 0 < config.num_eval_steps <= index:
      break
    nelbos.append(np.asarray(trainer.eval_step(
        params, global_batch(batch, trainer.batch_sharding), jax.random.fold_in(rng, index))))
  bits = np.concatenate(nelbos) / (math.prod(dataset.example_shape) * math.log(2))
  result = {"eval_bits_per_token": float(bits.mean()),
            "eval_bits_per_token_stderr": float(bits.std(ddof=1) / math.sqrt(len(bits))),
            "eval_examples": len(bits)}
  if dataset.entropy_bits_per_token is not None:
    result["data_entropy_bits_per_token"] = dataset.entropy_bits_per_token
  return result


def write_samples(config: ml_collections.ConfigDict, trainer: Trainer, params: Any,
                  dataset: data_lib.Dataset, workdir: epath.Path, step: int,
                  rng: Array) -> None:
  """Text to samples/step_<N>.txt; images to a PNG grid and a reverse-process strip."""
  is_image = dataset.decode is None
  num_frames = config.num_montage_frames if is_image and config.model_type == "md4" else 0
  outputs = trainer.sample(params, rng, config.num_samples, num_frames)
  samples, frames = outputs if num_frames else (outputs, None)
  samples = np.asarray(multihost_utils.process_allgather(samples, tiled=True))
  if jax.process_index() != 0:
    return
  folder = workdir / "samples"
  if is_image:
    visualize.write_image_samples(folder, step, samples,
                                  None if frames is None else np.asarray(frames))
    return
  folder.mkdir(parents=True, exist_ok=True)
  text = "\n".join(dataset.decode(sample) for sample in samples)
  (folder / f"step_{step}.txt").write_text(text + "\n")


def summary_line(eval_metrics: dict[str, float]) -> str:
  """One line for the end of a run: the held-out bound, and the true entropy when known."""
  line = f"held-out NELBO: {eval_metrics['eval_bits_per_token']:.4f} bits per token"
  entropy = eval_metrics.get("data_entropy_bits_per_token")
  if entropy is not None:
    line += (f"; source entropy: {entropy:.4f} bits per token "
             f"(gap {eval_metrics['eval_bits_per_token'] - entropy:+.4f})")
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


def checkpoint_manager(config: ml_collections.ConfigDict,
                       workdir: epath.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpointing)
  return ocp.CheckpointManager(
      workdir / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a model of another shape."""


def _path_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_compatible(saved_state: Any, abstract_state: TrainState, directory: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
  saved = {_path_name(path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(saved_state["params"])}
  expected = {_path_name(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)}
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      raise CheckpointMismatchError(
          f"checkpoint {directory} does not fit this model: parameter {name} has shape "
          f"{saved.get(name, 'absent')} there and {expected.get(name, 'absent')} in the "
          "config. Use the config it was trained with, or another --workdir.")


def restore_or_init(manager: ocp.CheckpointManager, trainer: Trainer,
                    dataset: data_lib.Dataset, rng: Array) -> TrainState:
  """The newest readable checkpoint's state (and data position), or a fresh state.

  An unreadable checkpoint is reported and moved aside to checkpoints_unreadable/
  (nothing is deleted), and the one before it is tried.
  """
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(trainer.init, rng), trainer.state_sharding)
  for step in sorted(manager.all_steps(), reverse=True):
    directory = manager.directory / str(step)
    try:
      check_compatible(manager.item_metadata(step)["state"], abstract, str(directory))
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(dataset.train)))
    except CheckpointMismatchError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      aside = manager.directory.parent / "checkpoints_unreadable" / str(step)
      logging.error("Checkpoint %s is unreadable (%s: %s); moving it to %s and trying the "
                    "previous one.", directory, type(error).__name__, error, aside)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        directory.rename(aside)
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
      manager.reload()
      continue
    logging.info("Restored checkpoint at step %d from %s", step, manager.directory)
    return restored.state
  return trainer.init(rng)


@contextlib.contextmanager
def saving_errors(manager: ocp.CheckpointManager, step: int):
  """Turns a failed (possibly asynchronous) save into an error that says what is kept."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    raise OSError(
        f"saving a checkpoint (at or before step {step}) in {manager.directory} failed: "
        f"{type(error).__name__}: {error}. The older checkpoints there are intact; free "
        "disk space or fix the path, then re-run to resume from the latest of them.") from error


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

  def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
    if jax.process_count() > 1:
      self.requested = self.requested or manager.reached_preemption(step)
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

  mesh = make_mesh(config)
  dataset = data_lib.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape,
                        dataset.num_classes)
  trainer = build_trainer(config, model, mesh)
  rng_init, rng_train, rng_eval, rng_sample = jax.random.split(
      jax.random.PRNGKey(config.seed), 4)

  manager = checkpoint_manager(config, workdir)
  state = restore_or_init(manager, trainer, dataset, rng_init)
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

  def save(step: int) -> None:
    with saving_errors(manager, step):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(dataset.train)))

  try:
    while step < config.num_train_steps:
      batch = global_batch(next(dataset.train), trainer.batch_sharding)
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
        eval_metrics = evaluate(config, trainer, state.ema_params, dataset, rng_eval)
        writer.write_scalars(step, eval_metrics)
      if step % config.sample_every_steps == 0 or last:
        write_samples(config, trainer, state.ema_params, dataset, workdir, step,
                      jax.random.fold_in(rng_sample, step))
      preempted = preemption.reached(manager, step)
      if step % config.checkpoint_every_steps == 0 or last or preempted:
        if config.check_nans and history:
          check_finite(jax.device_get(history))
        save(step)
      if preempted:
        with saving_errors(manager, step):
          manager.wait_until_finished()
        raise SystemExit(f"Preempted at step {step}: checkpoint saved in "
                         f"{manager.directory}; re-run the same command to resume.")
  finally:
    with saving_errors(manager, step):
      manager.wait_until_finished()
    manager.close()
    writer.close()
    preemption.restore()
  return eval_metrics
