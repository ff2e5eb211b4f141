"""Orbax checkpoints of the train state and the data position, for training and evaluation.

A checkpoint at step N is `workdir/checkpoints/N/` with two items: "state"
(a `TrainState`: step, parameters, optimizer state, EMA parameters) and
"data" (the grain iterator's position). Restoring checks that the saved
parameters have the shapes the config builds before reading any array.
"""

import contextlib
from typing import Any, Callable

from absl import logging
from etils import epath
import flax
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

Array = jnp.ndarray


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any


class CheckpointMismatchError(ValueError):
  """A checkpoint written by a model of another shape."""


def manager(config: ml_collections.ConfigDict, workdir: epath.Path) -> ocp.CheckpointManager:
  """The training run's manager: keeps config.keep_checkpoints, saves asynchronously if asked."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      enable_async_checkpointing=config.async_checkpointing)
  return ocp.CheckpointManager(
      workdir / "checkpoints", options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def abstract_state(init: Callable[[Array], TrainState], sharding: Any) -> TrainState:
  """ShapeDtypeStructs of init's state, each with its sharding: what a restore fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      jax.eval_shape(init, jax.random.PRNGKey(0)), sharding)


def _path_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_compatible(saved_params: Any, expected_params: Any, directory: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
  saved = {_path_name(path): tuple(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(saved_params)}
  expected = {_path_name(path): tuple(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(expected_params)}
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      raise CheckpointMismatchError(
          f"checkpoint {directory} does not fit this model: parameter {name} has shape "
          f"{saved.get(name, 'absent')} there and {expected.get(name, 'absent')} in the "
          "config. Use the config it was trained with, or another --workdir.")


def restore_or_init(checkpoints: ocp.CheckpointManager, init: Callable[[Array], TrainState],
                    sharding: Any, train_iterator: grain.DatasetIterator,
                    rng: Array) -> TrainState:
  """The newest readable checkpoint's state (and data position), or init(rng).

  An unreadable checkpoint is reported and moved aside to checkpoints_unreadable/
  (nothing is deleted), and the one before it is tried.
  """
  abstract = abstract_state(init, sharding)
  for step in sorted(checkpoints.all_steps(), reverse=True):
    directory = checkpoints.directory / str(step)
    try:
      check_compatible(checkpoints.item_metadata(step)["state"]["params"], abstract.params,
                       str(directory))
      restored = checkpoints.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(train_iterator)))
    except CheckpointMismatchError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      aside = checkpoints.directory.parent / "checkpoints_unreadable" / str(step)
      logging.error("Checkpoint %s is unreadable (%s: %s); moving it to %s and trying the "
                    "previous one.", directory, type(error).__name__, error, aside)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        directory.rename(aside)
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
      checkpoints.reload()
      continue
    logging.info("Restored checkpoint at step %d from %s", step, checkpoints.directory)
    return restored.state
  return init(rng)


def restore_ema_params(workdir: epath.Path, step: int | None, init: Callable[[Array], TrainState],
                       sharding: Any) -> tuple[int, Any]:
  """(step, TrainState.ema_params of that checkpoint (default: the latest)); nothing else is read.

  The parameters come back sharded as `sharding.ema_params` says.
  """
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    raise ValueError(f"no checkpoints in workdir={str(workdir)!r}: {folder} does not exist")
  # A read-only manager of its own: the partial restore needs the PyTree handler.
  checkpoints = ocp.CheckpointManager(folder, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise ValueError(f"no checkpoints in workdir={str(workdir)!r}: {folder} holds no "
                       "finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"step={step}: no checkpoint at that step in {folder}; "
                       f"available steps: {sorted(steps)}")
    item = {"ema_params": abstract_state(init, sharding).ema_params}
    check_compatible(checkpoints.item_metadata(step)["state"]["ema_params"],
                     item["ema_params"], str(folder / str(step)))
    restored = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  finally:
    checkpoints.close()
  logging.info("Restored the EMA parameters of step %d from %s", step, folder)
  return step, restored.state["ema_params"]


@contextlib.contextmanager
def saving_errors(checkpoints: ocp.CheckpointManager, step: int):
  """Turns a failed (possibly asynchronous) save into an error that says what is kept."""
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    raise OSError(
        f"saving a checkpoint (at or before step {step}) in {checkpoints.directory} failed: "
        f"{type(error).__name__}: {error}. The older checkpoints there are intact; free "
        "disk space or fix the path, then re-run to resume from the latest of them.") from error


def save(checkpoints: ocp.CheckpointManager, state: TrainState,
         train_iterator: grain.DatasetIterator) -> None:
  """Starts saving state and the data position at state.step (asynchronously if configured)."""
  step = int(state.step)
  with saving_errors(checkpoints, step):
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(train_iterator)))
