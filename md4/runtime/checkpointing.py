"""Orbax checkpoints of the train state and the data position, for training and evaluation.

A checkpoint at step N is `workdir/checkpoints/N/` with four items:
"state" (an `md4.trainer.TrainState`: step, parameters, optimizer state, EMA parameters),
"data" (the training iterator's position, the same on every process, so a
checkpoint written by N processes restores on M), "checksums" (one per array
of the state, to catch contents that changed after the save) and "config"
(the config it was trained with, which `md4.evaluate` uses).

Restoring checks that the saved arrays have the shapes the config builds
before reading any, retries errors that do not show damage, and moves a
checkpoint shown to be damaged to `workdir/checkpoints_damaged/` (nothing
is deleted). When checkpoints exist and none restores, the run stops.

`Saves` starts the saves of a run and checks them at every step: a failed
one stops the run naming its step and what is kept (`left_behind`), unless
the workdir's object store did not answer (`md4.runtime.outage`).
"""

import json
import re
import secrets
import shutil
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from md4.runtime import errors
from md4.runtime import orbax_quiet
from md4.runtime import outage
from md4.runtime import storage

Array = jnp.ndarray

DAMAGED_DIR = "checkpoints_damaged"
RESTORE_ATTEMPTS = 3
# Tensorstore status codes that mean the bytes read are not what was written.
_DAMAGE_CODES = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|"
                           r"INVALID_ARGUMENT):")


# The train state (`md4.trainer.TrainState`): a pytree with step, params, opt_state, ema_params.
TrainState = Any


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a model of another shape."""


class DamagedCheckpointError(ValueError):
  """A checkpoint whose files are not what was saved."""


class CheckpointReadError(OSError):
  """A checkpoint that could not be read, for a reason that does not show damage."""


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist, and none of them restores."""


def manager(config: ml_collections.ConfigDict, workdir: epath.Path) -> ocp.CheckpointManager:
  """The training run's manager: keeps config.keep_checkpoints, saves asynchronously if asked.

  It deletes the unfinished checkpoints a killed run left, so that a step is
  never saved over a partial one (the workdir lock keeps other runs away).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpointing,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      workdir / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler(),
                     "checksums": ocp.JsonCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})


def abstract_state(init: Callable[[Array], TrainState], sharding: Any) -> TrainState:
  """ShapeDtypeStructs of init's state, each with its sharding: what a restore fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(init, jax.random.PRNGKey(0)), sharding)


def _path_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _named_leaves(tree: Any) -> dict[str, Any]:
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(saved: Any, expected: Any, directory: str) -> None:
  """Raises CheckpointMismatchError naming the first array whose shape differs (params first)."""
  saved = {name: tuple(leaf.shape) for name, leaf in _named_leaves(saved).items()}
  expected = {name: tuple(leaf.shape) for name, leaf in _named_leaves(expected).items()}
  for name in sorted(set(saved) | set(expected), key=lambda n: (not n.startswith("params."), n)):
    if saved.get(name) != expected.get(name):
      raise CheckpointMismatchError(
          f"checkpoint {directory} does not fit this model: array {name} has shape "
          f"{saved.get(name, 'absent')} there and {expected.get(name, 'absent')} in the "
          "config. Use the config it was trained with, or another --workdir.")


def _checksum(x: Array) -> Array:
  """Sum of each element's bits times an odd weight of its position, mod 2**32 (uint32 []).

  Modular sums do not depend on the order of summation, so the value is the
  same on any mesh and number of processes; a flipped bit changes it.
  """
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  position = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
    stride *= x.shape[axis]
  return jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def checksums(tree: Any) -> dict[str, int]:
  """{array name: `_checksum`} of every array of tree."""
  return {name: int(value) for name, value in _named_leaves(jax.device_get(_checksums(tree))).items()}


def verify_checksums(tree: Any, saved: dict[str, int], directory: str, prefix: str = "") -> None:
  """Raises DamagedCheckpointError naming the arrays of tree (saved under prefix) that changed."""
  changed = [prefix + name for name, value in checksums(tree).items()
             if saved.get(prefix + name) != value]
  if changed:
    raise DamagedCheckpointError(
        f"the contents of {', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} "
        f"in {directory} changed after they were saved (checksum mismatch)")


def _shows_damage(error: BaseException) -> bool:
  """Whether error says a checkpoint's files are missing, cut short or not what was written."""
  return any(isinstance(cause, (DamagedCheckpointError, json.JSONDecodeError, FileNotFoundError))
             or _DAMAGE_CODES.match(str(cause)) for cause in errors.causes(error))


def _read_with_retries(read: Callable[[], Any], directory: str) -> Any:
  """read(), retried after errors that do not show damage; DamagedCheckpointError otherwise."""
  for attempt in range(1, RESTORE_ATTEMPTS + 1):
    try:
      with orbax_quiet.quiet():
        return read()
    except (CheckpointMismatchError, DamagedCheckpointError):
      raise
    except Exception as error:  # pylint: disable=broad-except
      if _shows_damage(error):
        raise DamagedCheckpointError(errors.reason(error)) from error
      if attempt == RESTORE_ATTEMPTS:
        raise CheckpointReadError(
            f"reading checkpoint {directory} failed {RESTORE_ATTEMPTS} times "
            f"({errors.reason(error)}); it does not look damaged, so it was left in place. "
            "Check the storage (network, permissions) and re-run.") from error
      logging.warning("Reading checkpoint %s failed (%s); retrying (attempt %d of %d)",
                      directory, errors.reason(error), attempt + 1, RESTORE_ATTEMPTS)
      time.sleep(2.0 ** attempt)


def _move_aside(checkpoints: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves checkpoint `step` to checkpoints_damaged/<step>-<time>-<random>: never a collision."""
  suffix = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
  aside = checkpoints.directory.parent / DAMAGED_DIR / f"{step}-{suffix}"
  if jax.process_index() == 0:
    storage.move_aside(checkpoints.directory / str(step), aside)
  else:
    aside = aside.parent  # Process 0 chose the name.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
  checkpoints.reload()
  return aside


def _damaged_earlier(workdir: epath.Path) -> list[str]:
  folder = workdir / DAMAGED_DIR
  return sorted(str(path) for path in folder.iterdir()) if folder.exists() else []


def restore_or_init(checkpoints: ocp.CheckpointManager, init: Callable[[Array], TrainState],
                    sharding: Any, train_iterator: grain.DatasetIterator, rng: Array,
                    allow_fresh_start: bool = False) -> TrainState:
  """The newest checkpoint that restores (the iterator set to its position), or init(rng).

  A checkpoint shown to be damaged is moved aside and the one before it is
  tried. If checkpoints exist (or were moved aside before) and none restores,
  NoUsableCheckpointError lists them, unless allow_fresh_start.
  """
  abstract = abstract_state(init, sharding)
  failures = []
  for step in sorted(checkpoints.all_steps(), reverse=True):
    directory = str(checkpoints.directory / str(step))

    def read(step=step, directory=directory):
      check_compatible(checkpoints.item_metadata(step)["state"], abstract, directory)
      restored = checkpoints.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
          checksums=ocp.args.JsonRestore()))
      verify_checksums(restored.state, restored.checksums, directory)
      return restored

    try:
      restored = _read_with_retries(read, directory)
    except DamagedCheckpointError as error:
      aside = _move_aside(checkpoints, step)
      logging.error("Checkpoint %s is damaged (%s); moved it to %s", directory, error, aside)
      failures.append(f"step {step}: {error} (moved to {aside})")
      continue
    train_iterator.set_state(restored.data)
    logging.info("Restored checkpoint at step %d from %s", step, checkpoints.directory)
    return restored.state
  workdir = checkpoints.directory.parent
  earlier = [path for path in _damaged_earlier(workdir)
             if not any(path in failure for failure in failures)]
  if (failures or earlier) and not allow_fresh_start:
    listing = "; ".join(failures + [f"{path} (moved aside by an earlier run)" for path in earlier])
    raise NoUsableCheckpointError(
        f"no checkpoint of workdir {workdir} restores: {listing}. Nothing was deleted. To "
        "train from step 0 all the same, re-run with --allow_fresh_start.")
  if failures or earlier:
    logging.warning("No checkpoint restores; starting from step 0 (--allow_fresh_start)")
  return init(rng)


def read_config(workdir: epath.Path, step: int | None) -> tuple[int, ml_collections.ConfigDict]:
  """(step, the config checkpoint `step` (default: the latest) of workdir was trained with)."""
  folder = workdir / "checkpoints"
  checkpoints = _read_only(folder, config=ocp.JsonCheckpointHandler())
  try:
    step = _existing_step(folder, checkpoints, step)
    directory = str(folder / str(step))
    restored = _read_with_retries(lambda: checkpoints.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())), directory)
  finally:
    checkpoints.close()
  return step, ml_collections.ConfigDict(restored.config)


def _existing_step(folder: epath.Path, checkpoints: ocp.CheckpointManager,
                   step: int | None) -> int:
  """step, or the latest when None; ValueError naming the folder when there is no such one."""
  steps = checkpoints.all_steps()
  if not steps:
    raise ValueError(f"no checkpoints in workdir={str(folder.parent)!r}: {folder} holds no "
                     "finished checkpoint")
  if step is None:
    return max(steps)
  if step not in steps:
    raise ValueError(f"step={step}: no checkpoint at that step in {folder}; "
                     f"available steps: {sorted(steps)}")
  return step


def _read_only(folder: epath.Path, **item_handlers) -> ocp.CheckpointManager:
  if not folder.is_dir():
    raise ValueError(f"no checkpoints in workdir={str(folder.parent)!r}: {folder} does not exist")
  return ocp.CheckpointManager(folder, item_handlers=item_handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True))


def restore_ema_params(workdir: epath.Path, step: int | None,
                       init: Callable[[Array], TrainState], sharding: Any) -> tuple[int, Any]:
  """(step, TrainState.ema_params of that checkpoint (default: the latest)), checked against
  its checksums; nothing else is read.

  The parameters come back sharded as `sharding.ema_params` says.
  """
  folder = workdir / "checkpoints"
  # A read-only manager of its own: the partial restore needs the PyTree handler.
  checkpoints = _read_only(folder, state=ocp.PyTreeCheckpointHandler(),
                           checksums=ocp.JsonCheckpointHandler())
  item = {"ema_params": abstract_state(init, sharding).ema_params}

  def read():
    check_compatible(checkpoints.item_metadata(step)["state"]["ema_params"],
                     item["ema_params"], directory)
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True),
        checksums=ocp.args.JsonRestore()))
    verify_checksums(restored.state["ema_params"], restored.checksums, directory,
                     prefix="ema_params.")
    return restored.state["ema_params"]

  try:
    step = _existing_step(folder, checkpoints, step)
    directory = str(folder / str(step))
    params = _read_with_retries(read, directory)
  finally:
    checkpoints.close()
  logging.info("Restored the EMA parameters of step %d from %s", step, folder)
  return step, params


class CheckpointSaveError(OSError):
  """A checkpoint save failed for a reason other than an object store's outage."""


def left_behind(folder: epath.Path) -> str:
  """What a run that stops now leaves in folder (its workdir/checkpoints), ending an error."""
  workdir = folder.parent
  # config.json is written when a run starts and never removed: gone, the workdir was deleted.
  deleted = (f"workdir {workdir} was deleted during the run, and "
             if not (workdir / "config.json").exists() else "")
  checkpoints = _read_only(folder) if folder.is_dir() else None
  steps = sorted(checkpoints.all_steps()) if checkpoints else []
  if checkpoints:
    checkpoints.close()
  if not steps:
    none = "of this run is left" if deleted else "was finished before it"
    return f"{deleted}no checkpoint {none}, so re-running starts from step 0"
  kept = (f"the checkpoint of step {steps[0]} is" if len(steps) == 1
          else f"the checkpoints of steps {', '.join(map(str, steps))} are")
  return (f"{deleted}{kept} kept in {folder}, and re-running the same command resumes from "
          f"step {steps[-1]}")


def _free_space(folder: epath.Path) -> str:
  """", N GB free on its disk" for a local folder, else ""."""
  if storage.is_object_store(folder) or not folder.exists():
    return ""
  return f", {shutil.disk_usage(folder).free / 1e9:.1f} GB free on its disk"


class Saves:
  """The run's checkpoint saves; a failed one surfaces at the next step boundary, naming its step.

  A save that fails because the workdir's object store does not answer is
  reported to `md4.runtime.outage` and started again, with the state of the
  moment, at the next step (`retry_due`); any other failure raises
  CheckpointSaveError naming the step, the folder and the checkpoints kept.
  """

  def __init__(self, checkpoints: ocp.CheckpointManager, train_iterator: grain.DatasetIterator,
               config: ml_collections.ConfigDict):
    self._checkpoints = checkpoints
    self._train_iterator = train_iterator
    self._config = config
    self._pending: tuple[int, float] | None = None  # (step, time.monotonic() at its start).
    self.retry_due = False
    orbax_quiet.silence_abandoned_writes()  # They fail at once, before the error is seen here.

  def start(self, state: TrainState) -> None:
    """Starts saving state, its checksums, the data position and the config at state.step."""
    self.wait()  # Orbax would wait for the previous save too, and raise its error as this one's.
    step, started = int(state.step), time.monotonic()
    written_at_start = self._checkpoints.directory.parent / "config.json"
    # Orbax would make the deleted folders again; a request each on a store, so only on disks.
    if not storage.is_object_store(written_at_start) and not written_at_start.exists():
      raise self._deleted(step, f"{written_at_start} is gone")
    self.retry_due = False
    try:
      self._checkpoints.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(self._train_iterator.get_state()),
          checksums=ocp.args.JsonSave(checksums(state)),
          config=ocp.args.JsonSave(json.loads(self._config.to_json_best_effort()))))
    except Exception as error:  # pylint: disable=broad-except
      self._failed(step, started, error)
      return
    self._pending = (step, started)
    if not self._checkpoints.is_saving_in_progress():
      self.wait()

  def check(self) -> None:
    """Raises the error of a save that has failed by now (never waits)."""
    if self._pending is not None and not self._checkpoints.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises its error."""
    if self._pending is None:
      return
    step, started = self._pending
    self._pending = None
    try:
      self._checkpoints.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._failed(step, started, error)
    else:
      outage.answered()

  def left_behind(self) -> str:
    """`left_behind` of the run's checkpoints, once the save in flight is finished."""
    self.wait()
    return left_behind(self._checkpoints.directory)

  def _failed(self, step: int, started: float, error: BaseException) -> None:
    if outage.tolerated(f"saving checkpoint {step}", error, started):
      self.retry_due = True
      return
    folder = self._checkpoints.directory
    if not (folder.parent / "config.json").exists() or any(
        isinstance(cause, FileNotFoundError) or str(cause).startswith("NOT_FOUND:")
        for cause in errors.causes(error)):
      raise self._deleted(step, errors.reason(error)) from error
    raise CheckpointSaveError(
        f"saving checkpoint {step} in {folder} failed ({errors.reason(error)}"
        f"{_free_space(folder)}). Free disk space or fix the path; "
        f"{left_behind(folder)}.") from error

  def _deleted(self, step: int, reason: str) -> CheckpointSaveError:
    """The error of a save that found files of the run deleted, maybe still being deleted:
    which checkpoints are left is unknown."""
    folder = self._checkpoints.directory
    return CheckpointSaveError(
        f"saving checkpoint {step} in {folder} failed ({reason}): files of the run were deleted "
        f"while it ran. If workdir {folder.parent} is gone, nothing of the run is left and "
        "re-running starts from step 0; else re-running the same command resumes from the "
        f"latest checkpoint left in {folder}.")
