"""One run per workdir: a lock file, WORKDIR/md4.lock, held by process 0 of the run.

The lock names the holder's host and pid and is refreshed every
HEARTBEAT_SECONDS. A second run stops at once, naming them. A lock is stale,
and is taken over with a warning, when its pid is dead on this host, or
when it has not been refreshed for STALE_SECONDS (its run died on a machine
that is gone, as after a Spot preemption). A lock file that holds no record
(empty or cut short by a crash) is taken over once DAMAGED_SECONDS old.
"""

import json
import os
import secrets
import socket
import threading
import time

from absl import logging
from etils import epath

from md4.runtime import outage
from md4.runtime import storage

LOCK_FILE = "md4.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0
# A lock file that holds no record this long after its last change was left by a crash.
DAMAGED_SECONDS = 5.0


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _alive_here(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's live process.
  return True


class WorkdirLock:
  """The lock of one workdir; acquire() before writing anything there, release() at the end."""

  def __init__(self, workdir: epath.Path):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                    "token": secrets.token_hex(8), "started": time.time()}
    self._stop = threading.Event()
    self._heartbeat = None

  def _record(self) -> str:
    return json.dumps({**self._holder, "refreshed": time.time()})

  def _stale_reason(self, holder: dict) -> str | None:
    if holder["host"] == socket.gethostname() and not _alive_here(holder["pid"]):
      return f"its process {holder['pid']} on this host is gone"
    age = time.time() - holder["refreshed"]
    if age > STALE_SECONDS:
      return f"it was last refreshed {age / 60:.0f} minutes ago"
    return None

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLockedError naming the run that holds it."""
    for _ in range(3):  # A lock released or taken over meanwhile: look again.
      if storage.create_exclusive(self.path, self._record()):
        self._heartbeat = threading.Thread(target=self._refresh, name="md4-lock", daemon=True)
        self._heartbeat.start()
        return
      try:
        holder = json.loads(self.path.read_text())
      except FileNotFoundError:
        continue
      except ValueError:  # Empty or cut short: a crash while the lock was first written.
        if not self._take_over_damaged():
          time.sleep(1.0)
        continue
      stale = self._stale_reason(holder)
      if stale is None:
        raise WorkdirLockedError(
            f"workdir {self.path.parent} is in use by another run: pid {holder['pid']} on "
            f"host {holder['host']}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(holder['started']))}. Stop "
            f"that run or use another --workdir (if it is gone, delete {self.path}).")
      logging.warning("Taking over the stale lock %s of pid %d on %s: %s", self.path,
                      holder["pid"], holder["host"], stale)
      self.path.unlink()
    raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it; "
                             f"if no run uses workdir {self.path.parent}, delete {self.path}")

  def _take_over_damaged(self) -> bool:
    """Deletes a lock that is not JSON once it is DAMAGED_SECONDS old; whether it did."""
    try:
      age = time.time() - self.path.stat().mtime
    except FileNotFoundError:
      return True
    if age < DAMAGED_SECONDS:  # A holder may be writing it this moment.
      return False
    logging.warning("Taking over the lock %s, which is not a lock record (%d bytes, %.0f s old)",
                    self.path, len(self.path.read_bytes()), age)
    self.path.unlink()
    return True

  def _holds(self) -> bool:
    try:
      return json.loads(self.path.read_text())["token"] == self._holder["token"]
    except (FileNotFoundError, ValueError):
      return False

  def _refresh(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      started = time.monotonic()
      try:
        if not self._holds():
          logging.error("The lock %s %s; this run no longer holds it", self.path,
                        "was taken by another run" if self.path.exists() else "was deleted")
          return
        storage.write_whole(self.path, self._record())
      except Exception as error:  # pylint: disable=broad-except
        if not outage.tolerated("refreshing the workdir lock", error, started):
          raise
      else:
        outage.answered()

  def release(self) -> None:
    """Gives the lock up (if this run still holds it)."""
    self._stop.set()
    if self._heartbeat is not None and self._holds():
      self.path.unlink()
    self._heartbeat = None
