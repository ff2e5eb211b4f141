"""Entry point: python -m md4.main --config=configs/<name>.py --workdir=DIR."""

import glob
import logging as python_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from md4 import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; override keys with --config.key=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs that "
    "jax cannot detect by itself (Cloud TPU and SLURM are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(python_logging.Filter):
  """Orbax logs every checkpoint step at INFO; keep its warnings only."""

  def filter(self, record) -> bool:
    return record.levelno >= python_logging.WARNING or "orbax" not in record.pathname


def _on_cloud_tpu_vm() -> bool:
  """TPU VMs expose their chips as /dev/accel* or /dev/vfio/<n>; jax finds the other hosts."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _initialize_distributed() -> None:
  """Joins the other processes of a multi-process run, if this is one."""
  # CPU-only processes need a collectives backend to talk to each other.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  _initialize_distributed()
  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  eval_metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0 and eval_metrics:
    print(train.summary_line(eval_metrics))


if __name__ == "__main__":
  app.run(main)
