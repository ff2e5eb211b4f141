"""Preemption: on SIGTERM, checkpoint the current step and exit with PREEMPTED_EXIT_CODE.

Spot TPUs, Compute Engine and SLURM give about 30 s of notice, so the notice
is honoured within seconds wherever the run is. Between training steps the
loop asks `reached(step)` and, when it is, saves and raises `Preempted`.
Everywhere else (restoring, compiling, evaluating, sampling, waiting for a
save) the current step is already saved, and the run marks those stretches
with `exits_at_once`: a notice there ends the process at once from a watcher
thread, after the `on_exit` callbacks (finish the pending save, close files),
even while the main thread is inside a long XLA call. While nothing can be
saved (`cannot_save`: the workdir's object store does not answer), a notice
exits at once without them.

One process: a SIGTERM handler, and a watcher woken through the signal
wakeup fd. Several processes: JAX's preemption service (started by
jax.distributed) takes the notice and makes every process stop at the same
step; the watcher polls the notice it posts to the coordination service.
"""

import contextlib
import os
import select
import signal
import sys
import threading
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils

from md4.runtime.errors import Preempted
from md4.runtime.errors import PREEMPTED_EXIT_CODE

# The key JAX's preemption sync manager sets in the coordination service on a notice.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
_POLL_SECONDS = 1.0
_BARRIER_MS = 120_000


def _barrier() -> None:
  """Waits for every process at a host-level barrier (the devices may be busy)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier("md4_preempted", _BARRIER_MS)


class Preemption:
  """Watches for the preemption notice; see the module docstring."""

  def __init__(self, num_processes: int | None = None):
    """num_processes: None asks JAX, which starts its backends; a command without JAX gives 1."""
    self._notice = threading.Event()
    self._lock = threading.Lock()
    self._exit_sections: list[str] = []
    self._cannot_save: str | None = None
    self._on_exit: list[Callable[[], None]] = []
    self._previous_handler = None
    self._wakeup = None
    self._closed = threading.Event()
    if (jax.process_count() if num_processes is None else num_processes) == 1:
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)
      self._wakeup = (read_fd, write_fd)
      self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
      self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      target = self._wait_for_signal
    else:
      target = self._poll_coordination_service
      # Runs last: no process exits while another still commits the checkpoint (a
      # launcher such as srun --kill-on-bad-exit kills the others at the first exit).
      self.on_exit(_barrier)
    threading.Thread(target=target, name="md4-preemption", daemon=True).start()

  def _handle(self, signum, frame) -> None:
    """Runs in the main thread between two bytecodes: the loop's next check sees the notice."""
    del signum, frame
    self._notice.set()

  def _wait_for_signal(self) -> None:
    read_fd, write_fd = self._wakeup
    while not self._closed.is_set():
      ready, _, _ = select.select([read_fd], [], [], _POLL_SECONDS)
      if ready and signal.SIGTERM in os.read(read_fd, 64):
        self._noticed()
    os.close(read_fd)
    os.close(write_fd)

  def _poll_coordination_service(self) -> None:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    while not self._closed.wait(_POLL_SECONDS):
      try:
        distributed.global_state.client.key_value_try_get(_NOTICE_KEY)
      except Exception:  # pylint: disable=broad-except  # Not posted (yet).
        continue
      self._noticed()
      return

  def _noticed(self) -> None:
    """The watcher's part: exits at once where nothing is unsaved, or nothing can be saved."""
    self._notice.set()
    with self._lock:
      if self._cannot_save is not None:
        self._exit_now(self._cannot_save, nothing_saved=True)
      logging.warning("Preemption notice (SIGTERM): saving the current step, then exiting")
      if self._exit_sections:
        self._exit_now(self._exit_sections[-1])

  def cannot_save(self, why: str | None) -> None:
    """Marks (why: what stops it) or ends (None) a stretch in which nothing can be saved: a
    notice then exits at once, without the on_exit callbacks, which would wait for storage."""
    with self._lock:
      self._cannot_save = why
      if why is not None and self._notice.is_set():
        self._exit_now(why, nothing_saved=True)

  def on_exit(self, callback: Callable[[], None]) -> None:
    """Runs callback before an exit from an `exits_at_once` stretch (last added, first run)."""
    self._on_exit.insert(0, callback)

  @contextlib.contextmanager
  def exits_at_once(self, what: str):
    """A stretch (named `what` in the log) during which nothing is unsaved: a notice exits."""
    with self._lock:
      if self._notice.is_set():
        self._exit_now(what)
      self._exit_sections.append(what)
    try:
      yield
    finally:
      with self._lock:
        self._exit_sections.pop()

  def _exit_now(self, what: str, nothing_saved: bool = False) -> None:
    """Runs the on_exit callbacks (unless nothing_saved) and exits with PREEMPTED_EXIT_CODE."""
    state = ("; nothing more can be saved, the latest checkpoint saved before is kept"
             if nothing_saved else ", with nothing unsaved")
    logging.warning("Preempted while %s%s: exiting", what, state)
    for callback in [] if nothing_saved else self._on_exit:
      try:
        callback()
      except Exception:  # pylint: disable=broad-except  # Exit all the same, with the reason.
        logging.exception("while exiting on preemption")
    print(f"md4: {Preempted(f'Preempted while {what}{state}')}", file=sys.stderr, flush=True)
    logging.flush()
    os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every process gets the same answer at each step."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notice.is_set()

  def close(self) -> None:
    """Stops watching; SIGTERM gets its previous handler back."""
    if self._wakeup is not None and not self._closed.is_set():
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      signal.signal(signal.SIGTERM, self._previous_handler)
    self._closed.set()  # The watcher closes the pipe when it sees this.
