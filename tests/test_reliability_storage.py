"""Storage that fails under a run: a full disk, a deleted or read-only workdir, an object
store that goes away. Each ends with one `md4: error:` line that says only what is true of
the checkpoints left, and the exit code a launcher acts on.

Each command runs in an empty current directory, which must stay empty.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import orbax.checkpoint as ocp
import pytest

from md4.runtime.errors import PREEMPTED_EXIT_CODE
from tests import test_gcs
from tests.test_gcs import gcs_server  # pylint: disable=unused-import  # A fixture.
from tests.test_reliability import REPO
from tests.test_reliability import TINY
from tests.test_reliability import final_params
from tests.test_reliability import free_port

pytestmark = pytest.mark.slow
CONFIG = f"--config={REPO / 'configs/quickstart.py'}"


def environment(**variables: str) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
              XLA_FLAGS="--xla_force_host_platform_device_count=1", **variables)


def run_in(cwd: pathlib.Path, command: list[str], **variables: str) -> subprocess.CompletedProcess:
  cwd.mkdir(exist_ok=True)
  return subprocess.run(command, cwd=cwd, env=environment(**variables), capture_output=True,
                        text=True, timeout=600)


def train(workdir: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "md4.main", CONFIG, f"--workdir={workdir}", *TINY, *overrides]


def error_line(stderr: str) -> str:
  """The one `md4: error:` line of stderr (asserted to be the only one, with no traceback)."""
  lines = [line for line in stderr.splitlines() if line.startswith("md4: error: ")]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


# A disk that fills up after the checkpoint of step 5: no file may then grow past 200 kB.
FULL_DISK = """
import resource, signal, sys
import orbax.checkpoint as ocp
from md4 import main
original_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == 10:
    self.wait_until_finished()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
  return original_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
main.cli()
"""


def test_a_full_disk_names_the_failed_save_before_the_next_and_keeps_the_last(tmp_path):
  workdir = tmp_path / "run"
  result = run_in(tmp_path / "cwd", [sys.executable, "-c", FULL_DISK, *train(workdir)[3:],
                                     "--config.num_train_steps=40",
                                     "--config.checkpoint_every_steps=5",
                                     "--config.log_every_steps=5", "--config.eval_every_steps=15"])
  assert result.returncode == 1
  error = error_line(result.stderr)
  assert error.startswith(f"md4: error: saving checkpoint 10 in {workdir}/checkpoints failed "
                          "(ValueError: OUT_OF_RANGE: "), error
  assert "File too large" in error and "GB free on its disk" in error, error
  assert error.endswith(f"the checkpoint of step 5 is kept in {workdir}/checkpoints, and "
                        "re-running the same command resumes from step 5."), error
  # Raised before the save of step 15 started, and so before the evaluation after it.
  assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == [
      "10.orbax-checkpoint-tmp", "5"]
  assert not any("eval_bits_per_token" in line for line in (workdir / "metrics.jsonl").open())
  final_params(workdir, 5)
  assert not os.listdir(tmp_path / "cwd")


def test_a_nan_before_any_checkpoint_says_none_is_kept(tmp_path):
  workdir = tmp_path / "run"
  result = run_in(tmp_path / "cwd", train(workdir, "--config.num_train_steps=40",
                                          "--config.checkpoint_every_steps=20",
                                          "--config.log_every_steps=1",
                                          "--config.optimizer.learning_rate=1e30",
                                          "--config.optimizer.warmup_steps=1"))
  assert result.returncode == 1
  error = error_line(result.stderr)
  assert "; stopping (config.check_nans). Lower the learning rate or fix the data; no " \
         "checkpoint was finished before it, so re-running starts from step 0." in error, error
  assert not os.listdir(workdir / "checkpoints")
  assert not os.listdir(tmp_path / "cwd")


def test_a_workdir_deleted_mid_run_is_named_as_gone(tmp_path):
  workdir = tmp_path / "run"
  (tmp_path / "cwd").mkdir()
  log = (tmp_path / "stderr").open("w+")
  process = subprocess.Popen(train(workdir, "--config.num_train_steps=100000",
                                   "--config.checkpoint_every_steps=5",
                                   "--config.log_every_steps=5"),
                             cwd=tmp_path / "cwd", env=environment(), stderr=log,
                             stdout=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / "checkpoints/10").exists():
    assert process.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()
    time.sleep(0.1)
  # Gone at once (as `rm -rf` is not): which checkpoints are left is known when md4 looks.
  workdir.rename(tmp_path / "deleted")
  shutil.rmtree(tmp_path / "deleted", ignore_errors=True)  # Orbax may be writing there.
  # md4 exits at once after its error line (the failed save's threads once held it minutes).
  assert process.wait(timeout=120) == 1
  error = error_line((tmp_path / "stderr").read_text())
  assert f"files of the run were deleted while it ran. If workdir {workdir} is gone, " \
         "nothing of the run is left and re-running starts from step 0; else re-running the " \
         "same command resumes from the latest checkpoint left in " in error, error
  assert "intact" not in error and "kept" not in error
  assert not os.listdir(tmp_path / "cwd")


def read_only(folder: pathlib.Path, command: list[str]) -> list[str]:
  """command, run with folder mounted read-only (in a mount namespace of its own)."""
  script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
            'exec "$@"')
  return ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command]


def test_a_read_only_workdir_is_one_line_from_training_and_evaluation(tmp_path):
  workdir = tmp_path / "run"
  steps = ["--config.checkpoint_every_steps=5", "--config.log_every_steps=5",
           "--config.eval_every_steps=10", "--config.sample_every_steps=10"]
  assert run_in(tmp_path / "cwd", train(workdir, "--config.num_train_steps=10",
                                        *steps)).returncode == 0
  if run_in(tmp_path / "cwd", read_only(workdir, ["true"])).returncode != 0:
    pytest.skip("mounting needs user namespaces (unshare), which this machine does not allow")
  before = {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()}

  trained = run_in(tmp_path / "cwd", read_only(workdir, train(
      workdir, "--config.num_train_steps=20", *steps)))
  assert trained.returncode == 1
  assert error_line(trained.stderr) == (
      f"md4: error: --workdir {workdir} cannot be written ({workdir} is read-only for this "
      "user): make it writable, or name another --workdir")
  evaluated = run_in(tmp_path / "cwd", read_only(workdir, [
      sys.executable, "-m", "md4.evaluate", f"--workdir={workdir}", "--num_eval_batches=1"]))
  assert evaluated.returncode == 1
  assert error_line(evaluated.stderr) == (
      f"md4: error: the results folder {workdir}/eval cannot be written ({workdir} is "
      "read-only for this user): pass --output_dir=DIR to write the results elsewhere")
  assert len(evaluated.stderr.splitlines()) < 10, evaluated.stderr  # Checked before restoring.
  assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == before
  assert not os.listdir(tmp_path / "cwd")


class Gate:
  """A TCP forwarder to the GCS server: `close` makes the store go away (connections refused,
  open ones cut), `open` brings it back."""

  def __init__(self, server_url: str):
    self._server_port = int(server_url.rsplit(":", 1)[1])
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._lock = threading.Lock()
    self._sockets: list[socket.socket] = []
    self.open()

  def open(self) -> None:
    self._listener = socket.create_server(("127.0.0.1", self.port))
    threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

  def close(self) -> None:
    with self._lock:
      for each in [self._listener, *self._sockets]:
        try:
          each.shutdown(socket.SHUT_RDWR)  # Wakes the threads blocked on it.
        except OSError:
          pass
        each.close()
      self._sockets.clear()

  def _accept(self, listener: socket.socket) -> None:
    while True:
      try:
        client, _ = listener.accept()
      except OSError:  # Closed.
        return
      server = socket.create_connection(("127.0.0.1", self._server_port))
      with self._lock:
        self._sockets += [client, server]
      for source, destination in ((client, server), (server, client)):
        threading.Thread(target=self._forward, args=(source, destination), daemon=True).start()

  @staticmethod
  def _forward(source: socket.socket, destination: socket.socket) -> None:
    try:
      while data := source.recv(1 << 16):
        destination.sendall(data)
      destination.shutdown(socket.SHUT_WR)
    except OSError:  # Cut by close.
      pass


def committed(server_url: str, run: str) -> list[int]:
  """Steps of the checkpoints of gs://BUCKET/<run> whose commit finished."""
  return sorted(int(name.split("/")[2]) for name in test_gcs.objects(server_url, f"{run}/")
                if name.endswith("/commit_success.txt"))


@pytest.fixture
def gate(gcs_server):
  forwarder = Gate(gcs_server)
  yield forwarder
  forwarder.close()


def start_training(tmp_path: pathlib.Path, gate: Gate, run: str, budget: int):
  (tmp_path / "cwd").mkdir()
  log = tmp_path / f"{run}.stderr"
  process = subprocess.Popen(
      train(f"gs://{test_gcs.BUCKET}/{run}", "--config.num_train_steps=1000000",
            "--config.checkpoint_every_steps=20", "--config.log_every_steps=10",
            f"--config.storage_retry_seconds={budget}"),
      cwd=tmp_path / "cwd", env=environment(STORAGE_EMULATOR_HOST=gate.url),
      stdout=subprocess.DEVNULL, stderr=log.open("w"))
  return process, log


def wait_for(condition, process: subprocess.Popen, log: pathlib.Path, what: str) -> None:
  deadline = time.time() + 300
  while not condition():
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, f"{what}: {log.read_text()[-3000:]}"
    time.sleep(0.2)


def test_an_object_store_gone_for_good_ends_the_run_retryably_after_the_budget(tmp_path, gate,
                                                                              gcs_server):
  process, log = start_training(tmp_path, gate, "gone", budget=20)
  wait_for(lambda: committed(gcs_server, "gone"), process, log, "no checkpoint")
  kept = committed(gcs_server, "gone")
  gate.close()
  assert process.wait(timeout=300) == PREEMPTED_EXIT_CODE
  stderr = log.read_text()
  error = error_line(stderr)
  assert error.startswith(f"md4: error: the object store gs://{test_gcs.BUCKET} has not "
                          "answered for "), error
  assert "(config.storage_retry_seconds=20; last: " in error
  assert error.endswith("re-run the same command once it answers, to resume from the latest "
                        "(exit code 75: retryable).")
  warnings = [line for line in stderr.splitlines() if " does not answer (" in line]
  assert warnings and all("into the outage, which ends the run at 20 s" in line
                          for line in warnings)
  assert set(kept) <= set(committed(gcs_server, "gone"))  # Nothing committed was lost.
  assert not os.listdir(tmp_path / "cwd")


def test_a_short_outage_is_logged_and_survived_and_sigterm_in_one_exits_75(tmp_path, gate,
                                                                           gcs_server):
  process, log = start_training(tmp_path, gate, "short", budget=600)
  wait_for(lambda: committed(gcs_server, "short"), process, log, "no checkpoint")
  before_outage = committed(gcs_server, "short")[-1]
  gate.close()
  wait_for(lambda: " does not answer (" in log.read_text(), process, log, "no warning")
  gate.open()
  wait_for(lambda: " answers again, after an outage of " in log.read_text(), process, log,
           "no end of the outage")
  wait_for(lambda: committed(gcs_server, "short")[-1] > before_outage, process, log,
           "no checkpoint after the outage")

  gate.close()
  lines = len(log.read_text().splitlines())
  wait_for(lambda: " does not answer (" in "".join(log.read_text().splitlines()[lines:]),
           process, log, "no warning in the second outage")
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=15) == PREEMPTED_EXIT_CODE
  stderr = log.read_text()
  assert f"md4: Preempted while the object store gs://{test_gcs.BUCKET} does not answer; " \
         "nothing more can be saved, the latest checkpoint saved before is kept; re-run the " \
         "same command to resume." in stderr
  assert "Traceback" not in stderr and "md4: error" not in stderr
  assert not os.listdir(tmp_path / "cwd")


def test_a_start_while_the_object_store_does_not_answer_ends_retryably(tmp_path, gate):
  gate.close()
  process, log = start_training(tmp_path, gate, "unreachable", budget=600)
  assert process.wait(timeout=300) == PREEMPTED_EXIT_CODE
  error = error_line(log.read_text())
  assert error.startswith(f"md4: error: the object store gs://{test_gcs.BUCKET} does not "
                          "answer ("), error
  assert error.endswith("this step cannot wait for it: re-run the same command once it "
                        "answers, to resume from the latest checkpoint it holds (exit code 75: "
                        "retryable)."), error
  assert not os.listdir(tmp_path / "cwd")
