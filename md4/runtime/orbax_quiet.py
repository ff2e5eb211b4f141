"""Orbax's noise around a failed restore or save, kept in one place.

Orbax logs each failed array read at length (thousands of lines for one
damaged checkpoint); md4 logs one line per failed checkpoint instead. Reads
still in flight when a restore gives up fail later, when tensorstore calls
back into the closed event loop or when their coroutines are collected; they
say nothing the restore's own error did not. `quiet` silences both for the
duration of a restore and puts back every logger level, filter and hook it
touched; after a failed read it leaves its two filters (which drop nothing but
such reads) for the rest of the process, since the abandoned reads fail later.
A failed save leaves writes in flight that fail the same way, at once and in
the background: `silence_abandoned_writes`, called before a run's first save,
drops them for the rest of the process.
`tests/test_reliability.py: test_orbax_quiet_still_has_reads_to_silence`
fails when Orbax stops leaving such reads behind (then this module can go).
"""

import contextlib
import gc
import logging as python_logging
import sys
from typing import Any, Callable, Iterator

from absl import logging

# How Orbax and asyncio word the errors of abandoned reads.
_READ_ERROR = "Encountered error while reading array index"
_CLOSED_LOOP = "Event loop is closed"


def is_abandoned_read(error: BaseException | None) -> bool:
  """Whether error comes from an Orbax array read that a failed restore left behind."""
  return (str(error).startswith(_READ_ERROR)
          or (isinstance(error, RuntimeError) and str(error) == _CLOSED_LOOP))


class _AbandonedReads(python_logging.Filter):
  """Drops asyncio's "exception was never retrieved" records of abandoned reads into silenced."""

  def __init__(self, silenced: list[BaseException]):
    super().__init__()
    self.silenced = silenced

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.exc_info and is_abandoned_read(record.exc_info[1]):
      self.silenced.append(record.exc_info[1])
      return False
    return True


def _drop_abandoned(unraisablehook: Callable[[Any], None],
                    silenced: list[BaseException]) -> Callable[[Any], None]:
  """unraisablehook, except for abandoned reads and writes, which go to silenced."""

  def filtered(unraisable: Any) -> None:
    if is_abandoned_read(unraisable.exc_value):
      silenced.append(unraisable.exc_value)
    else:
      unraisablehook(unraisable)

  return filtered


_ABANDONED_AFTER_SAVES: list[BaseException] = []


def silence_abandoned_writes() -> None:
  """For the rest of the process, drops the failures of the writes a failed save leaves in
  flight: each says "Event loop is closed", after the save's own error said what failed."""
  if not any(isinstance(f, _AbandonedReads) and f.silenced is _ABANDONED_AFTER_SAVES
             for f in python_logging.getLogger("asyncio").filters):
    python_logging.getLogger("asyncio").addFilter(_AbandonedReads(_ABANDONED_AFTER_SAVES))
    sys.unraisablehook = _drop_abandoned(sys.unraisablehook, _ABANDONED_AFTER_SAVES)


@contextlib.contextmanager
def quiet() -> Iterator[list[BaseException]]:
  """Silences Orbax's log and the abandoned reads of a failed restore inside the block.

  Yields the list of abandoned-read errors it silenced, filled as they come.
  """
  silenced: list[BaseException] = []
  orbax_logger = logging.get_absl_logger()
  level = orbax_logger.level
  asyncio_logger = python_logging.getLogger("asyncio")
  records = _AbandonedReads(silenced)
  unraisablehook = sys.unraisablehook
  orbax_logger.setLevel(python_logging.CRITICAL + 1)  # Python levels: absl.logging.FATAL is -3.
  asyncio_logger.addFilter(records)
  sys.unraisablehook = _drop_abandoned(unraisablehook, silenced)
  try:
    yield silenced
  except BaseException:
    # A failed restore leaves reads in flight that fail later, even at exit: the two filters,
    # which drop nothing but such reads, stay for the rest of the process.
    gc.collect()
    orbax_logger.setLevel(level)
    raise
  gc.collect()  # The abandoned reads' coroutines are collected now, while filtered.
  sys.unraisablehook = unraisablehook
  asyncio_logger.removeFilter(records)
  orbax_logger.setLevel(level)
