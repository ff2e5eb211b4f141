"""One-off data preparation for a config: `python -m md4.data.prepare --config=configs/x.py`.

Runs the `prepare` of the source config.dataset names (md4.data): a download,
a tokenisation, a conversion; each source's docstring says what. Prints one
JSON line describing what is ready; an error is one line, `md4: error: ...`
(md4.runtime.errors).
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from md4 import data as data_lib
from md4.runtime import errors
from md4.runtime import startup


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(data_lib.prepare_dataset(errors.loaded(flags.FLAGS.config))))


def cli() -> None:
  """`python -m md4.data.prepare` and `md4-prepare`.

  Flags are defined here, not on import, so md4.main can import md4.data.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  errors.run(main, argv=startup.find_config(sys.argv))


if __name__ == "__main__":
  cli()
