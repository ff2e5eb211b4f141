"""How md4's commands end: `md4: error: ...` on one line, or the preemption exit code.

An error md4 raises on purpose (its message says what is wrong and what to
do) is printed as one line, `md4: error: <message>`, and the command exits
with 1; --verbosity=1 shows the traceback instead. Errors raised elsewhere
(bugs) keep their traceback. A bad command-line flag is reported on one line
too. A preemption exits with PREEMPTED_EXIT_CODE, which the launch scripts
take as "re-run me", and so does a `RetryableError`, printed as one line.
Light to import: no JAX here, so that --help stays fast.
"""

import ast
import functools
import os
import sys
import traceback
from typing import Callable, Iterator, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections

# EX_TEMPFAIL of sysexits.h, "try again later": the launch scripts re-run (or requeue) on it.
PREEMPTED_EXIT_CODE = 75
# md4/, one level above this module's md4/runtime/.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Preempted(SystemExit):
  """The run saved its step and stopped on a preemption notice.

  The message ends saying that re-running the same command resumes.
  """

  def __init__(self, message: str):
    super().__init__(f"{message}; re-run the same command to resume.")


class RetryableError(RuntimeError):
  """An error that re-running the same command later may not meet (a store that does not
  answer): one `md4: error:` line, and PREEMPTED_EXIT_CODE, which the launch scripts re-run."""


def raised_by_md4(error: BaseException) -> bool:
  """Whether a raise statement of md4's own code raised error (not a bug's AttributeError)."""
  frames = traceback.extract_tb(error.__traceback__)
  return (bool(frames) and (frames[-1].line or "").startswith("raise ")
          and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR + os.sep))


def _one_line(error: BaseException) -> str:
  """str(error) on one line; a KeyError's repr'd message (ml_collections raises those) unquoted."""
  text = str(error)
  try:
    text = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pass
  return " ".join(str(text).split())


def causes(error: BaseException) -> Iterator[BaseException]:
  """error, then what it was raised from or while handling, innermost last."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def reason(error: BaseException) -> str:
  """The innermost cause's type and first line: one line per failure in the log."""
  cause = list(causes(error))[-1]
  line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
  if len(line) > 300:  # Long paths in the middle; what went wrong is at either end.
    line = f"{line[:120]} ... {line[-180:]}"
  return f"{type(cause).__name__}: {line}"


def loaded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The --config flag's config; ml_collections defers a failure to load it, raised here."""
  try:
    config.keys()
  except OSError as error:
    raise ValueError(f"--config could not be loaded: {_one_line(error)}") from error
  return config


def _reporting(main: Callable[[list[str]], None], started: list[bool]
               ) -> Callable[[list[str]], None]:
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    started.append(True)
    try:
      main(argv)
    except Preempted as preempted:
      print(f"md4: {preempted}", file=sys.stderr, flush=True)
      sys.exit(PREEMPTED_EXIT_CODE)
    except RetryableError as error:
      exit_with(error, PREEMPTED_EXIT_CODE)
    except Exception as error:  # pylint: disable=broad-except
      if logging.get_verbosity() >= 1 or not raised_by_md4(error):
        raise
      exit_with(error, 1)

  return wrapped


def exit_with(error: BaseException, code: int) -> NoReturn:
  """Prints md4's one line for error and exits at once: the caller's cleanup has run (or
  cannot), and the threads of a failed Orbax save can hold a normal exit for minutes."""
  logging.flush()
  print(f"md4: error: {_one_line(error)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def _list_flags_in_help(module: str) -> None:
  """Makes module's flags key flags of sys.argv[0], the module absl's --help lists.

  Under a console script (md4-train) sys.argv[0] is the script, which defines
  no flag, so --help would list none.
  """
  for flag in flags.FLAGS.get_flags_for_module(module):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
  """app.run(main, argv), ending as the module docstring says; --help lists main's module's flags."""
  _list_flags_in_help(main.__module__)
  started = []
  try:
    app.run(_reporting(main, started), argv=argv)
  except Exception as error:  # pylint: disable=broad-except
    if started:  # Not md4's: its traceback.
      raise
    print(f"md4: error: in the command-line flags: {_one_line(error)} (--helpfull lists them)",
          file=sys.stderr, flush=True)
    sys.exit(1)
