"""Scale-out and reliability: processes, FSDP memory, kills, preemption, damaged state.

Each test runs `python -m md4.main` (or a short script) in subprocesses, as a
user or a cluster would.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from md4.runtime.errors import PREEMPTED_EXIT_CODE

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.seq_len=16", "--config.batch_size=8", "--config.model.width=32",
        "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.synthetic.num_eval_examples=16", "--config.sample_steps=8",
        "--config.eval_every_steps=1000", "--config.sample_every_steps=1000"]

pytestmark = pytest.mark.slow


def environment(devices: int = 1) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "md4.main", "--config=configs/quickstart.py",
          f"--workdir={workdir}", *TINY, *overrides]


def run(command: list[str], devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=REPO, env=environment(devices), capture_output=True,
                        text=True, timeout=timeout)


def final_params(workdir: pathlib.Path, step: int):
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"]


def assert_same_params(first, second):
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, first, second)


def wait_for(path: pathlib.Path, process: subprocess.Popen, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not path.exists():
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def train_lines(workdir: pathlib.Path) -> dict[int, dict]:
  """metrics.jsonl's training line of each step, asserting that no step is there twice."""
  lines = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      record.pop("steps_per_sec")
      assert record["step"] not in lines, f"step {record['step']} twice in metrics.jsonl"
      lines[record["step"]] = record
  return lines


def run_processes(workdir: pathlib.Path, num_processes: int, *overrides: str) -> None:
  """md4.main as num_processes jax.distributed processes on localhost, one CPU device each."""
  port = free_port()
  processes = [
      subprocess.Popen(
          main_command(workdir, *overrides, f"--coordinator_address=localhost:{port}",
                       f"--num_processes={num_processes}", f"--process_id={index}"),
          cwd=REPO, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for index in range(num_processes)
  ]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def test_resume_across_process_counts_equals_one_uninterrupted_run(tmp_path):
  """2 processes train to step 4; 1 process resumes to 8; 2 processes resume to 12."""
  # A constant learning rate, so that stopping at 4 or 8 does not change the schedule.
  every_step = ["--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
                "--config.optimizer.warmup_steps=0", "--config.optimizer.min_lr_ratio=1.0"]
  single = run(main_command(tmp_path / "single", "--config.num_train_steps=12", *every_step),
               devices=2)
  assert single.returncode == 0, single.stderr[-3000:]
  elastic = tmp_path / "elastic"
  run_processes(elastic, 2, "--config.num_train_steps=4", *every_step)
  resumed = run(main_command(elastic, "--config.num_train_steps=8", *every_step), devices=2)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Restored checkpoint at step 4" in resumed.stderr
  run_processes(elastic, 2, "--config.num_train_steps=12", *every_step)
  single_lines, elastic_lines = train_lines(tmp_path / "single"), train_lines(elastic)
  assert sorted(elastic_lines) == list(range(1, 13))
  for step, line in single_lines.items():
    np.testing.assert_allclose(elastic_lines[step]["loss"], line["loss"], rtol=1e-5)
    np.testing.assert_allclose(elastic_lines[step]["grad_norm"], line["grad_norm"], rtol=1e-5)


FSDP_MEMORY = """
import json, jax
from md4 import trainer as trainer_lib
from md4.runtime import sharding
from tests.test_train import tiny_config
out = {}
for name, shape, axes in [("data", (8,), ("data",)), ("fsdp2", (4, 2), ("data", "fsdp")),
                          ("fsdp8", (1, 8), ("data", "fsdp")),
                          ("fsdp4_tensor2", (1, 4, 2), ("data", "fsdp", "tensor"))]:
  config = tiny_config(mesh_shape=shape, mesh_axes=axes, batch_size=8)
  config.model.width, config.model.num_heads = 256, 4
  dataset, trainer = trainer_lib.build(config)
  state = trainer.init(jax.random.PRNGKey(0))
  batch = sharding.global_batch(next(dataset.train), trainer.batch_sharding)
  compiled = trainer.train_step.lower(state, batch, jax.random.PRNGKey(1)).compile()
  memory = compiled.memory_analysis()
  _, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
  out[name] = {"argument_bytes": memory.argument_size_in_bytes, "loss": float(metrics["loss"])}
print(json.dumps(out))
"""


def test_fsdp_shards_parameter_memory_and_keeps_the_loss():
  result = run([sys.executable, "-c", FSDP_MEMORY], devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  data_bytes = out["data"]["argument_bytes"]
  # The train state dominates the step's arguments; per device it falls about as 1/fsdp.
  for name, fsdp in [("fsdp2", 2), ("fsdp8", 8), ("fsdp4_tensor2", 8)]:
    ratio = out[name]["argument_bytes"] / data_bytes
    assert 0.7 / fsdp < ratio < 1.5 / fsdp, (name, ratio)
    np.testing.assert_allclose(out[name]["loss"], out["data"]["loss"], rtol=1e-5)


def compile_seconds(log: str) -> float:
  return float(log.split("Compiled the train step in ")[1].split()[0])


def test_sigkill_then_rerun_equals_an_uninterrupted_run_and_compiles_from_the_cache(tmp_path):
  # Far more steps than the kill needs, so that the kill lands mid-run.
  steps = ["--config.num_train_steps=60", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=5",
           f"--config.compilation_cache_dir={tmp_path / 'compilation_cache'}"]
  whole = run(main_command(tmp_path / "whole", *steps))
  assert whole.returncode == 0, whole.stderr[-3000:]
  process = subprocess.Popen(main_command(tmp_path / "killed", *steps), cwd=REPO,
                             env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  wait_for(tmp_path / "killed/checkpoints/10", process)
  process.send_signal(signal.SIGKILL)
  _, killed_log = process.communicate()
  resumed = run(main_command(tmp_path / "killed", *steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # The killed run's lock is stale (its pid is gone): taken over, not an error.
  assert "Taking over the stale lock" in resumed.stderr
  restored_at = int(resumed.stderr.split("Restored checkpoint at step ")[1].split()[0])
  assert 10 <= restored_at < 60
  assert_same_params(final_params(tmp_path / "whole", 60), final_params(tmp_path / "killed", 60))
  whole_lines, resumed_lines = train_lines(tmp_path / "whole"), train_lines(tmp_path / "killed")
  assert sorted(resumed_lines) == list(range(1, 61))  # Each step once.
  for step in range(restored_at + 1, 61):
    assert resumed_lines[step] == whole_lines[step], step
  # The same program twice more: the persistent cache compiles it in a fraction of the time.
  cold = compile_seconds(whole.stderr)
  for warm in (compile_seconds(killed_log), compile_seconds(resumed.stderr)):
    assert warm < cold / 2, (cold, warm)


def test_sigterm_saves_the_current_step_and_the_rerun_continues(tmp_path):
  steps = ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.log_every_steps=1"]
  process = subprocess.Popen(main_command(tmp_path, *steps), cwd=REPO, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").stat().st_size:
    assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
    time.sleep(0.05)  # Until the first step is logged: in the training loop.
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
  message = stderr.strip().splitlines()[-1]
  assert message.startswith("md4: Preempted at step ") and "re-run the same command" in message
  step = int(message.split("Preempted at step ")[1].split(":")[0])
  assert (tmp_path / "checkpoints" / str(step)).is_dir()
  assert not (tmp_path / "md4.lock").exists()
  rerun = run(main_command(tmp_path, f"--config.num_train_steps={step + 2}",
                           "--config.checkpoint_every_steps=100000"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Restored checkpoint at step {step}" in rerun.stderr
  assert (tmp_path / "checkpoints" / str(step + 2)).is_dir()


def test_sigterm_stops_two_processes_at_one_step_and_saves_it(tmp_path):
  port = free_port()
  steps = ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.log_every_steps=1"]
  processes = [
      subprocess.Popen(
          main_command(tmp_path, *steps, f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={index}"),
          cwd=REPO, env=environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for index in range(2)
  ]
  deadline = time.time() + 240
  while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").stat().st_size:
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.05)
  for process in processes:  # As a TPU maintenance event or scancel does: every host.
    process.send_signal(signal.SIGTERM)
  messages = []
  for process in processes:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    messages.append(stderr.strip().splitlines()[-1])
  assert messages[0] == messages[1] and messages[0].startswith("md4: Preempted at step ")
  step = int(messages[0].split("Preempted at step ")[1].split(":")[0])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [str(step)]


def test_sigterm_while_sampling_exits_within_seconds_with_the_step_saved(tmp_path):
  # Sampling with 10**6 steps takes minutes; it starts right after the evaluation line.
  process = subprocess.Popen(
      main_command(tmp_path, "--config.num_train_steps=3", "--config.sample_steps=1000000"),
      cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not ((tmp_path / "metrics.jsonl").exists()
             and "eval_bits_per_token" in (tmp_path / "metrics.jsonl").read_text()):
    assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
    time.sleep(0.1)
  time.sleep(2)  # Into the sampler's compiled loop.
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  _, stderr = process.communicate(timeout=60)
  assert time.time() - sent < 10, time.time() - sent
  assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith("md4: Preempted while sampling")
  assert (tmp_path / "checkpoints/3").is_dir()
  assert not (tmp_path / "md4.lock").exists()

  # md4.evaluate sampling from that checkpoint: the same.
  evaluating = subprocess.Popen(
      [sys.executable, "-m", "md4.evaluate", f"--workdir={tmp_path}", "--nonelbo", "--sample",
       "--steps=1000000"], cwd=REPO, env=environment(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(evaluating.stderr), daemon=True)
  reader.start()
  deadline = time.time() + 240
  while not any("Restored the EMA parameters" in line for line in lines):
    assert evaluating.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    time.sleep(0.1)
  time.sleep(3)  # Into the sampler's compiled loop.
  evaluating.send_signal(signal.SIGTERM)
  sent = time.time()
  evaluating.wait(timeout=60)
  assert time.time() - sent < 10, time.time() - sent
  reader.join(timeout=10)
  assert evaluating.returncode == PREEMPTED_EXIT_CODE, "".join(lines)[-3000:]
  assert lines[-1].startswith("md4: Preempted while evaluating")


def damage(checkpoint: pathlib.Path) -> None:
  """Cuts the largest file of a checkpoint's state in half."""
  files = [f for f in (checkpoint / "state").rglob("*") if f.is_file()]
  largest = max(files, key=lambda f: f.stat().st_size)
  with largest.open("r+b") as f:
    f.truncate(largest.stat().st_size // 2)


def flip_a_bit(checkpoint: pathlib.Path, array: str) -> None:
  """Rewrites one saved array with one bit flipped, in a valid encoding: only a checksum sees it."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "path": f"{array}/",
                                        "base": f"file://{checkpoint}/state/"}}
  store = ts.open(spec).result()
  values = store.read().result()
  values.view(np.uint32).flat[0] ^= 1 << 7
  store[...] = values


def test_damaged_checkpoints_are_moved_aside_and_a_run_with_none_left_stops(tmp_path):
  steps = ["--config.checkpoint_every_steps=2"]
  assert run(main_command(tmp_path, "--config.num_train_steps=4", *steps)).returncode == 0
  # A flipped bit in checkpoint 4: found by its checksum, moved aside, 2 restores.
  flip_a_bit(tmp_path / "checkpoints/4", "params.network.embed.embedding")
  rerun = run(main_command(tmp_path, "--config.num_train_steps=6", *steps))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "params.network.embed.embedding" in rerun.stderr and "checksum mismatch" in rerun.stderr
  assert "Restored checkpoint at step 2" in rerun.stderr
  assert "Event loop is closed" not in rerun.stderr
  # Checkpoint 4 again (retrained), and 6, cut short: 4 is moved aside a second time.
  damage(tmp_path / "checkpoints/4")
  damage(tmp_path / "checkpoints/6")
  rerun = run(main_command(tmp_path, "--config.num_train_steps=6", *steps))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stderr.count(" is damaged (") == 2
  assert "Restored checkpoint at step 2" in rerun.stderr
  aside = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir())
  assert aside == ["4", "4", "6"]
  # log_every_steps=50: only the last step of each run; the line of 4 went with the resume at 2.
  assert sorted(train_lines(tmp_path)) == [6]
  # Every checkpoint damaged: the run stops, listing each, and deletes nothing.
  for step in (2, 4, 6):
    damage(tmp_path / "checkpoints" / str(step))
  stopped = run(main_command(tmp_path, "--config.num_train_steps=6", *steps))
  assert stopped.returncode == 1
  error = [line for line in stopped.stderr.splitlines() if line.startswith("md4: error: ")]
  assert len(error) == 1 and "Traceback" not in stopped.stderr
  assert "no checkpoint of workdir" in error[0] and "--allow_fresh_start" in error[0]
  for step in ("step 6:", "step 4:", "step 2:", "moved aside by an earlier run"):
    assert step in error[0], step
  assert len(list((tmp_path / "checkpoints_damaged").iterdir())) == 6
  fresh = run(main_command(tmp_path, "--config.num_train_steps=2", *steps, "--allow_fresh_start"))
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  assert "Restored checkpoint" not in fresh.stderr
  assert sorted(train_lines(tmp_path)) == [2]


def test_checkpoint_of_another_shape_is_refused_before_anything_is_written(tmp_path):
  assert run(main_command(tmp_path, "--config.num_train_steps=2",
                          "--config.checkpoint_every_steps=2")).returncode == 0
  config = (tmp_path / "config.json").read_text()
  rerun = run(main_command(tmp_path, "--config.num_train_steps=4", "--config.model.width=64"))
  assert rerun.returncode == 1
  assert "array params.network." in rerun.stderr and "has shape" in rerun.stderr
  assert (tmp_path / "checkpoints/2").is_dir()
  assert (tmp_path / "config.json").read_text() == config  # md4.evaluate still reads it.
  # A change that works is made, logged key by key and kept in the history.
  longer = run(main_command(tmp_path, "--config.num_train_steps=3",
                            "--config.checkpoint_every_steps=2", "--config.seq_len=32"))
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "config.seq_len changed on resuming at step 2: 16 -> 32" in longer.stderr
  history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").open()]
  assert history == [{"step": 2, "time": history[0]["time"],
                      "changes": {"num_train_steps": [2, 3], "seq_len": [16, 32]}}]
  assert json.loads((tmp_path / "config.json").read_text())["seq_len"] == 32


def test_a_second_run_on_a_locked_workdir_stops_naming_the_first(tmp_path):
  from md4.runtime import lock  # pylint: disable=g-import-not-at-top
  first = lock.WorkdirLock(tmp_path)
  first.acquire()
  try:
    start = time.time()
    second = run(main_command(tmp_path, "--config.num_train_steps=2"))
    assert second.returncode == 1
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("md4: error: workdir ") and "in use by another run" in error
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in error
    assert time.time() - start < 60 and not (tmp_path / "checkpoints").exists()
  finally:
    first.release()
  assert not (tmp_path / "md4.lock").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  from md4.runtime import lock  # pylint: disable=g-import-not-at-top
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  (tmp_path / "md4.lock").write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "old",
       "started": time.time(), "refreshed": time.time()}))
  other_host = tmp_path / "other"
  other_host.mkdir()
  (other_host / "md4.lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "token": "old", "started": 0.0,
       "refreshed": time.time() - lock.STALE_SECONDS - 1}))
  for workdir in (tmp_path, other_host):
    held = lock.WorkdirLock(workdir)
    held.acquire()
    assert json.loads((workdir / "md4.lock").read_text())["pid"] == os.getpid()
    held.release()
  assert "is gone" in caplog.text and "minutes ago" in caplog.text


def test_an_empty_lock_is_taken_over_once_old_and_named_while_fresh(tmp_path, caplog):
  from md4.runtime import lock  # pylint: disable=g-import-not-at-top
  path = tmp_path / "md4.lock"
  path.write_bytes(b"")
  fresh = time.time() + 60  # Fresh however slowly the retries run: a holder may be writing it.
  os.utime(path, (fresh, fresh))
  with pytest.raises(lock.WorkdirLockedError, match=f"delete {path}"):
    lock.WorkdirLock(tmp_path).acquire()
  old = time.time() - lock.DAMAGED_SECONDS - 1
  os.utime(path, (old, old))
  held = lock.WorkdirLock(tmp_path)
  held.acquire()
  assert json.loads(path.read_text())["pid"] == os.getpid()
  held.release()
  assert "not a lock record (0 bytes" in caplog.text


def test_bad_input_is_one_line_naming_what_to_change(tmp_path):
  cases = [
      (["--config.model.widht=3"], 'Did you mean "width"'),
      (["--config.dataset=nope"], "config.dataset='nope' is not a data source"),
      (["--config.batch_size=6"], "config.batch_size=6 over config.grad_accum_steps=1"),
  ]
  for overrides, message in cases:
    result = run(main_command(tmp_path, *overrides), devices=4)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("md4: error: ")]
    assert len(error) == 1 and message in error[0], result.stderr[-2000:]
  assert "data-parallel devices of the mesh {'data': 4}" in error[0]
  verbose = run(main_command(tmp_path, "--config.dataset=nope", "--verbosity=1"))
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr
  assert not (tmp_path / "checkpoints").exists()
  for command, message in [
      (["md4.evaluate", "--workdir=/no/such/workdir"], "workdir='/no/such/workdir' is not a"),
      (["md4.data.prepare", "--config=configs/quickstart.py", "--config.dataset=nope"],
       "config.dataset='nope' is not a data source"),
      (["md4.data.prepare", "--config=configs/nope.py"], "--config could not be loaded"),
  ]:
    result = run([sys.executable, "-m", *command])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"md4: error: ")
    assert message in result.stderr.strip().splitlines()[-1]


def test_transient_read_errors_are_retried_then_raised_leaving_the_checkpoint(tmp_path,
                                                                              monkeypatch):
  from md4 import train, trainer as trainer_lib
  from md4.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp_path)
  dataset, trainer = trainer_lib.build(config)
  monkeypatch.setattr(checkpointing.time, "sleep", lambda seconds: None)
  original = ocp.CheckpointManager.restore
  failures = []

  def flaky(self, *args, **kwargs):
    if len(failures) < allowed_failures:
      failures.append(1)
      raise OSError("UNAVAILABLE: connection reset by peer")
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  for allowed_failures in (checkpointing.RESTORE_ATTEMPTS - 1, checkpointing.RESTORE_ATTEMPTS):
    failures.clear()
    checkpoints = checkpointing.manager(config, tmp_path)
    try:
      if allowed_failures < checkpointing.RESTORE_ATTEMPTS:
        state = checkpointing.restore_or_init(checkpoints, trainer.init, trainer.state_sharding,
                                              dataset.train, jax_key(0))
        assert int(state.step) == 2
      else:
        with pytest.raises(checkpointing.CheckpointReadError, match="failed 3 times"):
          checkpointing.restore_or_init(checkpoints, trainer.init, trainer.state_sharding,
                                        dataset.train, jax_key(0))
    finally:
      checkpoints.close()
  assert (tmp_path / "checkpoints/2").is_dir() and not (tmp_path / "checkpoints_damaged").exists()


def jax_key(seed: int):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.PRNGKey(seed)


def test_checksums_catch_a_flipped_bit_and_do_not_depend_on_the_layout():
  import jax  # pylint: disable=g-import-not-at-top
  from md4.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  tree = {"w": jax.random.normal(jax.random.PRNGKey(0), (5, 7)),
          "step": np.int32(3), "b": np.ones(4, np.float16)}
  saved = checkpointing.checksums(tree)
  checkpointing.verify_checksums(tree, saved, "dir")
  flipped = np.asarray(tree["w"]).copy()
  flipped.view(np.uint32)[2, 3] ^= 1
  with pytest.raises(checkpointing.DamagedCheckpointError, match="contents of w in dir"):
    checkpointing.verify_checksums({**tree, "w": flipped}, saved, "dir")
  swapped = np.asarray(tree["w"]).copy()
  swapped[0, 0], swapped[0, 1] = swapped[0, 1], swapped[0, 0]
  assert checkpointing.checksums({**tree, "w": swapped})["w"] != saved["w"]
  assert checkpointing.checksums({**tree, "w": np.asarray(tree["w"]).T.copy().T}) == saved


FULL_DISK = """
import json, resource, signal, sys
import orbax.checkpoint as ocp
from md4 import train
from tests.test_train import tiny_config
original_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step > 4:  # Only the saves at 2 and 4, so that no later save reports the failure.
    return False
  if step == 4:  # The disk fills up after the first checkpoint: files stop growing past 200 kB.
    self.wait_until_finished()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
  return original_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
config = tiny_config(num_train_steps=300, checkpoint_every_steps=2, log_every_steps=1,
                     eval_every_steps=10**6, sample_every_steps=10**6, async_checkpointing=ASYNC)
config.model.width = 128
try:
  train.train_and_evaluate(config, sys.argv[1])
except OSError as error:
  print("ERROR:", error)
print("LAST LOGGED STEP", [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")][-1]["step"])
"""


@pytest.mark.parametrize("asynchronous", [False, True])
def test_full_disk_fails_the_save_clearly_and_keeps_older_checkpoints(tmp_path, asynchronous):
  """A failed save is an error at once (synchronous) or at a step boundary soon after (async)."""
  result = run([sys.executable, "-c", FULL_DISK.replace("ASYNC", str(asynchronous)),
                str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ERROR: saving checkpoint 4 in " in result.stdout
  assert "the checkpoint of step 2 is kept in " in result.stdout
  last_logged = int(result.stdout.split("LAST LOGGED STEP ")[1])
  if asynchronous:  # The background write fails within a second; steps take milliseconds.
    assert 4 <= last_logged < 300, last_logged
  else:
    assert last_logged == 4
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",))
  assert manager.latest_step() == 2
  manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))


def test_eta_counts_days_and_steps_per_second_leave_out_other_work():
  from md4 import train  # pylint: disable=g-import-not-at-top
  assert train.format_duration(3 * 86400 + 4 * 3600 + 5 * 60 + 4) == "3d 04h 05m"
  assert train.format_duration(25 * 3600) == "1d 01h 00m"  # strftime("%H") wrapped this to 01.
  assert train.format_duration(3600 + 59) == "1h 00m"
  assert train.format_duration(61) == "1m 01s"
  progress = train.Progress(step=10)
  with progress.apart():  # Compiling, evaluating, sampling or saving.
    time.sleep(0.5)
  time.sleep(0.1)
  rate = progress.steps_per_sec(20)
  assert 10 / 0.5 < rate <= 10 / 0.1, rate
