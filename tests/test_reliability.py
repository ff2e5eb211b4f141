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
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

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
from md4 import data, models, sharding, train
from tests.test_train import tiny_config
out = {}
for name, shape, axes in [("data", (8,), ("data",)), ("fsdp2", (4, 2), ("data", "fsdp")),
                          ("fsdp8", (1, 8), ("data", "fsdp")),
                          ("fsdp4_tensor2", (1, 4, 2), ("data", "fsdp", "tensor"))]:
  config = tiny_config(mesh_shape=shape, mesh_axes=axes, batch_size=8)
  config.model.width, config.model.num_heads = 256, 4
  dataset = data.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape)
  trainer = train.build_trainer(config, model, sharding.make_mesh(config))
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


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
  # Far more steps than the kill needs, so that the kill lands mid-run.
  steps = ["--config.num_train_steps=60", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=5"]
  whole = run(main_command(tmp_path / "whole", *steps))
  assert whole.returncode == 0, whole.stderr[-3000:]
  process = subprocess.Popen(main_command(tmp_path / "killed", *steps), cwd=REPO,
                             env=environment(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  wait_for(tmp_path / "killed/checkpoints/10", process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run(main_command(tmp_path / "killed", *steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  restored_at = int(resumed.stderr.split("Restored checkpoint at step ")[1].split()[0])
  assert 10 <= restored_at < 60
  assert_same_params(final_params(tmp_path / "whole", 60), final_params(tmp_path / "killed", 60))
  whole_lines, resumed_lines = train_lines(tmp_path / "whole"), train_lines(tmp_path / "killed")
  for step in range(restored_at + 1, 61):
    assert resumed_lines[step] == whole_lines[step], step


def test_sigterm_saves_the_current_step_and_the_rerun_continues(tmp_path):
  steps = ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
           "--config.log_every_steps=1"]
  process = subprocess.Popen(main_command(tmp_path, *steps), cwd=REPO, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(tmp_path / "metrics.jsonl", process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode != 0
  message = stderr.strip().splitlines()[-1]
  assert message.startswith("Preempted at step ") and "re-run the same command" in message
  step = int(message.split("Preempted at step ")[1].split(":")[0])
  assert (tmp_path / "checkpoints" / str(step)).is_dir()
  rerun = run(main_command(tmp_path, f"--config.num_train_steps={step + 2}",
                           "--config.checkpoint_every_steps=100000"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Restored checkpoint at step {step}" in rerun.stderr
  assert (tmp_path / "checkpoints" / str(step + 2)).is_dir()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  steps = ["--config.num_train_steps=4", "--config.checkpoint_every_steps=2"]
  assert run(main_command(tmp_path, *steps)).returncode == 0
  files = [f for f in (tmp_path / "checkpoints/4/state").rglob("*") if f.is_file()]
  largest = max(files, key=lambda f: f.stat().st_size)
  with largest.open("r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  rerun = run(main_command(tmp_path, "--config.num_train_steps=6",
                           "--config.checkpoint_every_steps=2"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "checkpoints/4 is unreadable" in rerun.stderr
  assert "Restored checkpoint at step 2" in rerun.stderr
  assert (tmp_path / "checkpoints_unreadable/4").is_dir()  # Kept, not deleted.


def test_checkpoint_of_another_shape_names_the_parameter(tmp_path):
  assert run(main_command(tmp_path, "--config.num_train_steps=2",
                          "--config.checkpoint_every_steps=2")).returncode == 0
  rerun = run(main_command(tmp_path, "--config.num_train_steps=4", "--config.model.width=64"))
  assert rerun.returncode != 0
  assert "parameter network." in rerun.stderr and "has shape" in rerun.stderr
  assert (tmp_path / "checkpoints/2").is_dir()


FULL_DISK = """
import resource, signal, sys
import orbax.checkpoint as ocp
from md4 import train
from tests.test_train import tiny_config
original_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step > 2:  # The disk fills up after the first checkpoint: files stop growing past 20 kB.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
  return original_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
config = tiny_config(num_train_steps=4, checkpoint_every_steps=2, async_checkpointing=ASYNC)
config.model.width = 64
try:
  train.train_and_evaluate(config, sys.argv[1])
except OSError as error:
  print("ERROR:", error)
"""


@pytest.mark.parametrize("asynchronous", [False, True])
def test_full_disk_fails_the_save_clearly_and_keeps_older_checkpoints(tmp_path, asynchronous):
  result = run([sys.executable, "-c", FULL_DISK.replace("ASYNC", str(asynchronous)),
                str(tmp_path)])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ERROR: saving a checkpoint" in result.stdout
  assert "older checkpoints there are intact" in result.stdout
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",))
  assert manager.latest_step() == 2
  manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
