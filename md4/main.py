"""Entry point: python -m md4.main --config=configs/<name>.py --workdir=DIR."""

import logging as python_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from md4 import sharding
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  eval_metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0 and eval_metrics:
    print(train.summary_line(eval_metrics))


if __name__ == "__main__":
  app.run(main)
