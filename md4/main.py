"""Entry point: python -m md4.main --config=configs/<name>.py --workdir=DIR.

`--print_config` prints the resolved config and exits, training nothing.

Exits with 0 when training is done, with md4.runtime.errors.PREEMPTED_EXIT_CODE (75)
after saving on a preemption notice (re-run the same command to resume), and
with 1 on an error, printed as `md4: error: ...` (md4.runtime.errors).
"""

import logging as python_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from md4.runtime import errors
from md4.runtime import startup


class _QuietOrbax(python_logging.Filter):
  """Orbax logs every checkpoint step at INFO; keep its warnings only."""

  def filter(self, record) -> bool:
    return record.levelno >= python_logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  given = flags.FLAGS
  if given.print_config:
    from md4 import defaults  # pylint: disable=g-import-not-at-top
    print(defaults.validate(errors.loaded(given.config)).to_json_best_effort(indent=2))
    return
  startup.keep_host_buffers()
  # JAX and the training code load here, not on import: --help stays fast.
  import jax  # pylint: disable=g-import-not-at-top
  from md4.runtime import sharding  # pylint: disable=g-import-not-at-top
  from md4 import train  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietOrbax())
  sharding.initialize_distributed(given.coordinator_address, given.num_processes,
                                  given.process_id)
  logging.info("JAX process %d of %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  eval_metrics = train.train_and_evaluate(errors.loaded(given.config), given.workdir,
                                          allow_fresh_start=given.allow_fresh_start)
  if jax.process_index() == 0 and eval_metrics:
    print(train.summary_line(eval_metrics))


def define_config_flag() -> None:
  """--config=FILE with --config.key=value overrides (md4.compile reads configs the same way)."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file; override keys with --config.key=value.",
      lock_config=True)


def define_flags() -> None:
  """The command-line flags; defined when run as a command, not on import."""
  define_config_flag()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for multi-process runs that "
      "jax cannot detect by itself (Cloud TPU and SLURM are detected).")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_bool(
      "allow_fresh_start", False, "When checkpoints exist but none restores (each is listed "
      "in the error), train from step 0 instead of stopping; they stay in "
      "WORKDIR/checkpoints_damaged/.")
  flags.DEFINE_bool(
      "print_config", False, "Print the resolved config (the defaults, the config file and its "
      "--config.KEY=VALUE overrides), as WORKDIR/config.json would hold it, and exit.")
  flags.mark_flags_as_required(["config"])
  flags.register_multi_flags_validator(
      ["workdir", "print_config"], lambda given: bool(given["workdir"] or given["print_config"]),
      message="--workdir is required (it may be left out with --print_config)")


def cli() -> None:
  """`python -m md4.main` and `md4-train`."""
  define_flags()
  errors.run(main, argv=startup.find_config(sys.argv))


if __name__ == "__main__":
  cli()
