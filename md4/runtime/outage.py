"""An object store that stops answering: logged while it lasts, the run ended if it lasts too long.

While training in a gs:// (or s3://) workdir, a thread asks the store for a
file every PROBE_SECONDS, one request without retries. While the store
fails these probes, or md4's own requests (which its client retries: gcsfs
six times over about 35 s), md4 logs one warning line per failed request and
trains on: a failed checkpoint save is started again at the next step,
metrics wait in memory for the next upload. When the store answers again,
one line says how long the outage lasted.

An outage counts from the start of the first request that failed. Once it
has lasted config.storage_retry_seconds (20 minutes by default, Orbax's
limit on an asynchronous save), the run ends, within another
2 * PROBE_SECONDS, with one `md4: error:` line and PREEMPTED_EXIT_CODE (75,
"try again later"): the checkpoints the store holds are whole (Orbax commits
each at once), so re-running the same command once it answers resumes from
the latest. A request that cannot wait (taking the workdir at the start,
writing samples) and fails for want of an answer ends the run at once, the
same way. A preemption notice during an outage exits at once, with 75:
nothing can be saved then.
"""

import contextlib
import logging as python_logging
import os
import re
import threading
import time
from typing import Iterator, TYPE_CHECKING

from absl import logging

from md4.runtime import errors

if TYPE_CHECKING:  # Not imported at run time: storage imports this module, and it needs no JAX.
  from md4.runtime import preemption as preemption_lib

PROBE_SECONDS = 10.0  # How often the store is asked for a file, and how long it may take.
# Tensorstore's status codes for a request the server did not answer (ABORTED: retries spent).
_NO_ANSWER_CODES = re.compile(r"^(UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED):")
_PROBED_KEY = ".md4-probe"  # Never written: the store answers "not found", with no data.
# Tensorstore's key-value store driver of each object store scheme.
_KVSTORE_DRIVERS = {"gs": "gcs", "s3": "s3"}


def does_not_answer(error: BaseException) -> bool:
  """Whether error says a request got no answer (refused, cut, timed out, a 5xx or 429 reply)."""
  import aiohttp  # pylint: disable=g-import-not-at-top  # gcsfs's HTTP client.
  for cause in errors.causes(error):
    if (isinstance(cause, (ConnectionError, TimeoutError, aiohttp.ClientError))
        or _NO_ANSWER_CODES.match(str(cause))
        or getattr(cause, "code", None) in (429, 500, 502, 503, 504)):
      return True
  return False


class Outage:
  """How long the run's object store has failed its requests; see the module docstring."""

  def __init__(self, workdir: str, budget_seconds: float,
               preemption: "preemption_lib.Preemption"):
    """workdir: gs://BUCKET/PATH (or s3://), which is asked for a file every PROBE_SECONDS."""
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    scheme, _, path = workdir.partition("://")
    bucket, _, prefix = path.partition("/")
    self.store = f"{scheme}://{bucket}"
    driver = _KVSTORE_DRIVERS[scheme]
    # No retries: one probe is one request, and each failed one is logged.
    self._kvstore = ts.KvStore.open({
        "driver": driver, "bucket": bucket, "path": prefix.rstrip("/") + "/",
        "context": {f"{driver}_request_retries": {"max_retries": 0}}}).result()
    self._budget = budget_seconds
    self._preemption = preemption
    self._lock = threading.Lock()
    self._since: float | None = None  # time.monotonic() of the first failed request's start.
    self._reason = ""
    self._closed = threading.Event()
    threading.Thread(target=self._watch, name="md4-outage", daemon=True).start()

  def failed(self, what: str, error: BaseException, started: float) -> None:
    """A request begun at time.monotonic() `started` (while doing `what`) got no answer."""
    with self._lock:
      first = self._since is None
      self._since = started if first else min(self._since, started)
      self._reason = errors.reason(error)
      lasted = time.monotonic() - self._since
    logging.warning("The object store %s does not answer (%s) while %s: %.0f s into the "
                    "outage, which ends the run at %.0f s (config.storage_retry_seconds)",
                    self.store, self._reason, what, lasted, self._budget)
    if first:
      self._preemption.cannot_save(f"the object store {self.store} does not answer")

  def answered(self) -> None:
    """A request succeeded: an outage in progress is over."""
    with self._lock:
      since, self._since = self._since, None
    if since is not None:
      logging.warning("The object store %s answers again, after an outage of %.0f s",
                      self.store, time.monotonic() - since)
      self._preemption.cannot_save(None)

  def _probe(self) -> None:
    started = time.monotonic()
    try:
      self._kvstore.read(_PROBED_KEY).result(timeout=PROBE_SECONDS)
    except Exception as error:  # pylint: disable=broad-except
      if does_not_answer(error):
        self.failed("being probed", error, started)
        return
    self.answered()  # Any reply is an answer, a refusal too.

  def _watch(self) -> None:
    while not self._closed.wait(PROBE_SECONDS):
      self._probe()
      with self._lock:
        lasted = None if self._since is None else time.monotonic() - self._since
      if lasted is not None and lasted >= self._budget:
        self._give_up(lasted)

  def _give_up(self, lasted: float) -> None:
    """Ends the process with one error line and PREEMPTED_EXIT_CODE; nothing more can be saved."""
    errors.exit_with(errors.RetryableError(
        f"the object store {self.store} has not answered for {lasted:.0f} s "
        f"(config.storage_retry_seconds={self._budget:g}; last: {self._reason}). The "
        "checkpoints it holds are whole: re-run the same command once it answers, to resume "
        "from the latest (exit code 75: retryable)."), errors.PREEMPTED_EXIT_CODE)

  def close(self) -> None:
    self._closed.set()


_running: Outage | None = None  # The training run's, told of the requests its store fails.


def watch(outage: Outage | None) -> None:
  """Makes `tolerated` report to outage (None: raise every error again)."""
  global _running
  _running = outage


def tolerated(what: str, error: BaseException, started: float) -> bool:
  """Whether the request begun at `started` failed for want of an answer while an Outage
  watches: then it is reported there and the caller goes on; otherwise the caller raises."""
  if _running is None or not does_not_answer(error):
    return False
  _running.failed(what, error, started)
  return True


def answered() -> None:
  """A request to the store succeeded."""
  if _running is not None:
    _running.answered()


@contextlib.contextmanager
def watching(workdir: os.PathLike, budget_seconds: float,
             preemption: "preemption_lib.Preemption") -> Iterator[None]:
  """Inside: an Outage watches workdir's store if it is one, and the libraries' tracebacks of
  failed saves and requests are left out of the log (md4 reports each on one line)."""
  tracebacks = LibraryTracebacks()
  handler = logging.get_absl_handler()
  handler.addFilter(tracebacks)
  if os.fspath(workdir).split("://")[0] in _KVSTORE_DRIVERS:
    watch(Outage(os.fspath(workdir), budget_seconds, preemption))
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    if _running is None or not does_not_answer(error):
      raise
    raise errors.RetryableError(
        f"the object store {_running.store} does not answer ({errors.reason(error)}), and this "
        "step cannot wait for it: re-run the same command once it answers, to resume from the "
        "latest checkpoint it holds (exit code 75: retryable).") from error
  else:
    # Only after a clean end: what a failure leaves in flight fails later, also kept out.
    handler.removeFilter(tracebacks)
  finally:
    if _running is not None:
      _running.close()
    watch(None)


class LibraryTracebacks(python_logging.Filter):
  """Drops the tracebacks Orbax and gcsfs log for a failed save or request.

  md4 reports each on one line: a failed save (`checkpointing.Saves`), a store
  that does not answer (`Outage`).
  """

  def filter(self, record: python_logging.LogRecord) -> bool:
    from_library = any(f"{os.sep}{name}{os.sep}" in record.pathname for name in ("orbax", "gcsfs"))
    return not (from_library and record.exc_info)
