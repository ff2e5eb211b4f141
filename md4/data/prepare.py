"""One-off data preparation for a config: `python -m md4.data.prepare --config=configs/x.py`.

Runs the `prepare` of the source config.dataset names (md4.data): a download,
a tokenisation, a conversion; each source's docstring says what. Prints one
JSON line describing what is ready; an error is one line, `md4: error: ...`
(md4.runtime.errors). A preemption notice (SIGTERM) ends it within seconds
with md4.runtime.errors.PREEMPTED_EXIT_CODE: every source writes what marks
its data complete last, so a re-run redoes what was cut short.
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from md4 import data as data_lib
from md4.runtime import errors
from md4.runtime import preemption as preemption_lib
from md4.runtime import startup


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  preemption = preemption_lib.Preemption(num_processes=1)  # Without JAX, which a run may hold.
  with preemption.exits_at_once("preparing data"):
    summary = data_lib.prepare_dataset(errors.loaded(flags.FLAGS.config))
  preemption.close()
  print(json.dumps(summary))


def cli() -> None:
  """`python -m md4.data.prepare` and `md4-prepare`.

  Flags are defined here, not on import, so md4.main can import md4.data.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  errors.run(main, argv=startup.find_config(sys.argv))


if __name__ == "__main__":
  cli()
