"""train_and_evaluate: the training loop, which only glues.

`trainer` assembles mesh, data, model and the compiled steps, `sharding`
lays batches over the devices, `checkpointing` keeps the train state and the
data position, `likelihood` estimates the held-out bound.
"""

import contextlib
import json
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4 import defaults
from md4 import likelihood
from md4 import models
from md4 import sample_quality
from md4 import samples as samples_lib
from md4 import trainer as trainer_lib
from md4.runtime import checkpointing
from md4.runtime import compilation_cache
from md4.runtime import errors
from md4.runtime import lock
from md4.runtime import metric_writers
from md4.runtime import outage
from md4.runtime import preemption as preemption_lib
from md4.runtime import profiler as profiler_lib
from md4.runtime import progress as progress_lib
from md4.runtime import sharding as sharding_lib
from md4.runtime import storage

Array = jnp.ndarray
Metrics = dict[str, Array]


def evaluate(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
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


def draw_samples(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any, rng: Array,
                 num_samples: int, num_frames: int) -> tuple[models.Samples, np.ndarray]:
  """(trainer.sample's output, its tokens [N, ...] from every process), under a progress bar."""
  sampler, _ = models.configured_sampler(config)
  with progress_lib.bar(trainer.model.network_calls(sampler, config.sample_steps),
                        f"sampling {num_samples}", "call"):
    drawn = trainer.sample(params, rng, num_samples, num_frames)
    return drawn, np.asarray(multihost_utils.process_allgather(drawn.tokens, tiled=True))


def write_samples(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
                  dataset: data_lib.Dataset, workdir: epath.Path, step: int,
                  rng: Array, writer: metric_writers.MetricWriter) -> None:
  """Samples from params to workdir/samples/step_<N>.* (md4.samples) and TensorBoard."""
  with_frames = dataset.modality == "image" and "frames" in trainer.model.supports
  num_frames = config.num_montage_frames if with_frames else 0
  drawn, tokens = draw_samples(config, trainer, params, rng, config.num_samples, num_frames)
  if jax.process_index() == 0:
    frames = None if drawn.frames is None else np.asarray(drawn.frames)
    written = samples_lib.write(workdir / "samples", f"step_{step}", tokens, dataset, frames)
    writer.write_sample_files(step, written)


def timed_evaluation(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
                     dataset: data_lib.Dataset, step: int, writer: metric_writers.MetricWriter,
                     preemption: preemption_lib.Preemption) -> dict[str, float]:
  """evaluate at step, written with the seconds it took; a notice while evaluating exits."""
  start = time.perf_counter()
  with preemption.exits_at_once("evaluating"):
    eval_metrics = evaluate(config, trainer, params, dataset, config.seed)
  writer.write_scalars(step, {**eval_metrics, "eval_seconds": time.perf_counter() - start})
  return eval_metrics


def timed_samples(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
                  dataset: data_lib.Dataset, workdir: epath.Path, step: int, rng_sample: Array,
                  writer: metric_writers.MetricWriter,
                  preemption: preemption_lib.Preemption) -> None:
  """write_samples at step, with the rng of the step, logging the time it took; a notice exits."""
  start = time.perf_counter()
  with preemption.exits_at_once("sampling"):
    write_samples(config, trainer, params, dataset, workdir, step,
                  jax.random.fold_in(rng_sample, step), writer)
  logging.info("step %d: sampled in %.2f s", step, time.perf_counter() - start)


def written_at(metrics_path: epath.Path, step: int) -> dict[str, float]:
  """The metrics.jsonl values written at step, merged over its lines ({} without the file)."""
  written = {}
  if metrics_path.exists():
    for line in metrics_path.read_text().splitlines():
      record = json.loads(line)
      if record.pop("step") == step:
        written.update(record)
  return written


def finish(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
           dataset: data_lib.Dataset, workdir: epath.Path, step: int, rng_sample: Array,
           writer: metric_writers.MetricWriter,
           preemption: preemption_lib.Preemption) -> dict[str, float]:
  """The last step's evaluation, sample scores and samples, each unless the workdir has it.

  A resumed run so finishes what an interrupted one left, and a finished run
  re-run only reads its results. An evaluation or the scores are done when
  metrics.jsonl has their line at step, the samples when samples/step_<N>.npy
  (written last) exists. Returns the evaluation's metrics and the scores.
  """
  written = written_at(writer.jsonl_path, step)
  if "eval_bits_per_token" not in written:
    written.update(timed_evaluation(config, trainer, params, dataset, step, writer, preemption))
  wants_scores = config.num_quality_samples and dataset.known_source is not None
  if wants_scores and not any(name.startswith("samples/") for name in written):
    # A line of their own: the bound is written before the (slower) sampling starts.
    with preemption.exits_at_once("sampling"):
      scores = sample_scores(config, trainer, params, dataset, jax.random.split(rng_sample)[0])
    writer.write_scalars(step, scores)
    written.update(scores)
  if not (workdir / "samples" / f"step_{step}.npy").exists():
    timed_samples(config, trainer, params, dataset, workdir, step, rng_sample, writer, preemption)
  return {name: float(value) for name, value in written.items()
          if name.startswith(("eval_", "data_", "samples/")) and name != "eval_seconds"}


def sample_scores(config: ml_collections.ConfigDict, trainer: trainer_lib.Trainer, params: Any,
                  dataset: data_lib.Dataset, rng: Array) -> dict[str, float]:
  """md4.sample_quality's scores of config.num_quality_samples samples, keys prefixed "samples/"."""
  _, tokens = draw_samples(config, trainer, params, rng, config.num_quality_samples, 0)
  scores = sample_quality.scores(tokens, dataset, config.seed)
  return {f"samples/{name}": float(value) for name, value in scores.items()}


def summary_line(eval_metrics: dict[str, float]) -> str:
  """The end of a run: the held-out bound, the true entropy and the samples' scores when known."""
  line = f"held-out NELBO: {eval_metrics['eval_bits_per_token']:.4f} bits per token"
  entropy = eval_metrics.get("data_entropy_bits_per_token")
  if entropy is not None:
    line += (f"; source entropy: {entropy:.4f} bits per token "
             f"(gap {eval_metrics['eval_bits_per_token'] - entropy:+.4f})")
  scores = {name.removeprefix("samples/"): value for name, value in eval_metrics.items()
            if name.startswith("samples/")}
  if scores:
    line += "\n" + sample_quality.describe(scores)
  return line


def check_finite(history: list[tuple[int, Metrics]], saves: checkpointing.Saves) -> None:
  """Raises FloatingPointError at the first step whose metrics are not finite."""
  for step, metrics in history:
    for name in sorted(metrics, key=lambda name: name != "loss"):  # Loss is the likeliest culprit.
      value = metrics[name]
      if not np.isfinite(np.asarray(value)).all():
        raise FloatingPointError(
            f"step {step}: {name} is {value}; stopping (config.check_nans). Lower the learning "
            f"rate or fix the data; {saves.left_behind()}.")


def format_duration(seconds: float) -> str:
  """Days, hours and minutes ("2d 03h 15m"), or minutes and seconds under an hour: no wrapping."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  days, hours = divmod(hours, 24)
  if days:
    return f"{days}d {hours:02d}h {minutes:02d}m"
  if hours:
    return f"{hours}h {minutes:02d}m"
  return f"{minutes}m {secs:02d}s"


class Progress:
  """Steps per second over training steps only: compiling, evaluating, sampling and saving apart."""

  def __init__(self, step: int):
    self._step = step
    self._start = time.perf_counter()
    self._apart = 0.0

  @contextlib.contextmanager
  def apart(self):
    """A stretch whose time does not count as training."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._apart += time.perf_counter() - start

  def steps_per_sec(self, step: int) -> float:
    """Training steps per second since the previous call (or the start)."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._start - self._apart, 1e-9)
    self._step, self._start, self._apart = step, now, 0.0
    return rate


def _config_changes(old: Any, new: Any, prefix: str = "") -> dict[str, list[Any]]:
  """{dotted key: [old value, new value]} of every key whose value differs (absent: None)."""
  if isinstance(old, dict) and isinstance(new, dict):
    changes = {}
    for key in sorted(set(old) | set(new)):
      changes.update(_config_changes(old.get(key), new.get(key), f"{prefix}{key}."))
    return changes
  return {} if old == new else {prefix[:-1]: [old, new]}


def record_config(config: ml_collections.ConfigDict, workdir: epath.Path, step: int) -> None:
  """Writes workdir/config.json; changes from the one there are logged and kept in history.

  Each resume that changes keys appends {"step", "changes": {key: [old, new]}}
  to workdir/config_history.jsonl.
  """
  path = workdir / "config.json"
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    changes = _config_changes(json.loads(path.read_text()), new)
    for key, (old_value, new_value) in changes.items():
      logging.warning("config.%s changed on resuming at step %d: %r -> %r", key, step,
                      old_value, new_value)
    if changes:
      history = workdir / "config_history.jsonl"
      earlier = history.read_bytes() if history.exists() else b""
      line = json.dumps({"step": step, "time": time.time(), "changes": changes}) + "\n"
      storage.write_whole(history, earlier + line.encode())
  storage.write_whole(path, json.dumps(new, indent=2) + "\n")


def lock_workdir(workdir: epath.Path) -> lock.WorkdirLock | None:
  """Process 0 takes the workdir's lock; every process raises if it could not."""
  held, error = None, None
  if jax.process_index() == 0:
    held = lock.WorkdirLock(workdir)
    try:
      held.acquire()
    except lock.WorkdirLockedError as locked:
      held, error = None, locked
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = lock.WorkdirLockedError(f"process 0 could not lock workdir {workdir}: see its log")
  if error is not None:
    raise error
  return held


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_fresh_start: bool = False) -> dict[str, float]:
  """Trains config's model in workdir, resuming from its latest checkpoint.

  allow_fresh_start: start from step 0 when checkpoints exist but none
  restores (otherwise that is an error). On a preemption notice it saves and
  raises `errors.Preempted` (or, outside the training loop, where nothing is
  unsaved, exits with errors.PREEMPTED_EXIT_CODE: `md4.runtime.preemption`). Returns
  the last evaluation's metrics.
  """
  config = defaults.validate(config)
  storage.use_emulator_if_set()
  compilation_cache.enable(config)
  workdir = storage.workdir_path(workdir)
  is_main = jax.process_index() == 0
  preemption = preemption_lib.Preemption()
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(preemption.close)
    cleanup.enter_context(outage.watching(workdir, config.storage_retry_seconds, preemption))
    with preemption.exits_at_once("starting"):
      workdir.mkdir(parents=True, exist_ok=True)
      workdir_lock = lock_workdir(workdir)
      if workdir_lock is not None:
        cleanup.callback(workdir_lock.release)
        preemption.on_exit(workdir_lock.release)
      dataset, trainer = trainer_lib.build(config, for_training=True)
      rng_init, rng_train, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed), 3)
      checkpoints = checkpointing.manager(config, workdir)
      cleanup.callback(checkpoints.close)
      state = checkpointing.restore_or_init(checkpoints, trainer.init, trainer.state_sharding,
                                            dataset.train, rng_init, allow_fresh_start)
    step = int(state.step)
    if is_main:
      record_config(config, workdir, step)
    if step == 0:
      logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params))
    writer = metric_writers.MetricWriter(workdir, config, is_main, start_step=step)
    cleanup.callback(writer.close)
    preemption.on_exit(writer.close)

    saves = checkpointing.Saves(checkpoints, dataset.train, config)
    cleanup.callback(saves.wait)
    preemption.on_exit(saves.wait)
    saved_step = step  # Restored, or the start: nothing to save.

    def save_trained_steps():
      """On a notice while reading a batch: the steps trained since the last save.

      The data position is the one before the batch: grain advances it only
      when it returns the batch.
      """
      if saved_step != step:
        writer.flush()
        saves.start(state)

    preemption.on_exit(save_trained_steps)  # Runs before saves.wait.
    logging.info("Training %s on %s from step %d to %d on mesh %s", config.model_type,
                 config.dataset, step, config.num_train_steps, dict(trainer.mesh.shape))

    progress = Progress(step)
    profiler = profiler_lib.StepProfiler(config.profile_steps, workdir)
    cleanup.callback(profiler.close)
    history: list[tuple[int, Metrics]] = []
    compiled = False
    while step < config.num_train_steps:
      # A notice while a batch is read (the first may take minutes) exits at once, saving
      # what is unsaved; several processes could not agree on that step, so they wait.
      with (preemption.exits_at_once("reading a batch")
            if jax.process_count() == 1 or saved_step == step else contextlib.nullcontext()):
        batch = next(dataset.train)
      batch = sharding_lib.global_batch(batch, trainer.batch_sharding)
      if compiled:
        state, metrics = profiler.run(step + 1, trainer.train_step, state, batch, rng_train)
      else:
        with preemption.exits_at_once("compiling the train step"), progress.apart():
          start = time.perf_counter()
          state, metrics = profiler.run(step + 1, trainer.train_step, state, batch, rng_train)
          jax.block_until_ready(metrics)
          logging.info("Compiled the train step in %.2f s (its first run included)",
                       time.perf_counter() - start)
        compiled = True
      step += 1
      history.append((step, metrics))
      saves.check()
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        history = jax.device_get(history)
        if config.check_nans:
          check_finite(history, saves)
        steps_per_sec = progress.steps_per_sec(step)
        means = {k: float(np.mean([m[k] for _, m in history])) for k in history[0][1]}
        writer.write_scalars(step, {**means, "steps_per_sec": steps_per_sec})
        eta = (config.num_train_steps - step) / max(steps_per_sec, 1e-9)
        logging.info("step %d/%d  %.2f steps/s  ETA %s", step, config.num_train_steps,
                     steps_per_sec, format_duration(eta))
        history = []
      # The last step's evaluation and samples are `finish`'s.
      evaluating = step % config.eval_every_steps == 0 and not last
      sampling = step % config.sample_every_steps == 0 and not last
      preempted = preemption.reached(step)
      # Saved before evaluating or sampling, so that a notice during either loses nothing.
      if (step % config.checkpoint_every_steps == 0 or last or evaluating or sampling
          or preempted or saves.retry_due):
        if config.check_nans and history:
          check_finite(jax.device_get(history), saves)
        with progress.apart():
          writer.flush()
          saves.start(state)
        saved_step = step
      if preempted:
        with progress.apart():
          saves.wait()
        if jax.process_count() > 1:  # None exits before the checkpoint is committed.
          multihost_utils.sync_global_devices("preempted")
        raise errors.Preempted(
            f"Preempted at step {step}: checkpoint saved in {checkpoints.directory}")
      if evaluating:
        with progress.apart():
          timed_evaluation(config, trainer, state.ema_params, dataset, step, writer, preemption)
      if sampling:
        with progress.apart():
          timed_samples(config, trainer, state.ema_params, dataset, workdir, step, rng_sample,
                        writer, preemption)
    # Also when resumed at the last step: what the interrupted run left, or the summary only.
    eval_metrics = finish(config, trainer, state.ema_params, dataset, workdir, step, rng_sample,
                          writer, preemption)
    if is_main:
      writer.write_curves(step, f"{config.model_type} on {config.dataset}")
    with preemption.exits_at_once("finishing the last save"):
      saves.wait()
  return eval_metrics
