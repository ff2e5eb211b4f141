"""The README's two commands, as written, in a fresh copy of the repository and a fresh venv.

The Quick start command (install and train) runs once per test session,
shortened by appended `--config.*` overrides, and the Tests command then
reuses its virtual environment, shortened by a selection of one test file.
pip installs from the package index (or its cache); nothing else is fetched.
"""

import contextlib
import email.parser
import fcntl
import json
import os
import pathlib
import re
import subprocess
import zipfile

import pytest

from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT_QUICK_START = ("--config.num_train_steps=30", "--config.log_every_steps=10",
                     "--config.eval_every_steps=30", "--config.checkpoint_every_steps=30",
                     "--config.sample_every_steps=30", "--config.sample_steps=8",
                     "--config.synthetic.num_eval_examples=64")
TEST_SELECTION = "tests/test_schedule.py"

pytestmark = pytest.mark.slow


def _bash(command: str, cwd: pathlib.Path, timeout: int) -> subprocess.CompletedProcess:
  """Runs a README command as a user's shell would: no venv, no pytest state inherited."""
  env = {key: value for key, value in os.environ.items()
         if not key.startswith(("PYTEST_", "VIRTUAL_ENV", "PYTHONPATH"))}
  return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory) -> dict[str, object]:
  """The shortened Quick start command's run, shared by every xdist worker of the session."""
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = (tmp_path_factory.getbasetemp().parent / f"install-{run_id}" if run_id
          else tmp_path_factory.getbasetemp() / "install")
  root.mkdir(parents=True, exist_ok=True)
  with open(root / "lock", "w") as lock, contextlib.ExitStack() as stack:
    fcntl.flock(lock, fcntl.LOCK_EX)
    stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
    record = root / "quick_start.json"
    if not record.exists():
      benchmark = helpers.load_benchmark("quickstart")
      checkout = root / "md4"
      benchmark.copy_repository(checkout)
      readme = (REPO / "README.md").read_text()
      command = " ".join([benchmark.readme_command(readme, "Quick start"), *SHORT_QUICK_START,
                          f"--workdir={root / 'workdir'}"])
      result = _bash(command, checkout, timeout=1200)
      # The base install as the command left it, before the Tests command adds the test extra.
      listed = _bash(". .venv/bin/activate && pip list --format=json", checkout, timeout=120)
      size = _bash("du -sm .venv", checkout, timeout=120)
      record.write_text(json.dumps({
          "checkout": str(checkout), "workdir": str(root / "workdir"), "command": command,
          "returncode": result.returncode, "stdout": result.stdout,
          "stderr": result.stderr[-5000:],
          "packages": [package["name"].lower() for package in json.loads(listed.stdout or "[]")],
          "venv_megabytes": int(size.stdout.split()[0]) if size.returncode == 0 else -1}))
    return json.loads(record.read_text())


def test_readme_quick_start_installs_and_trains(quick_start):
  assert quick_start["returncode"] == 0, quick_start["stderr"]
  assert "source entropy" in quick_start["stdout"]
  workdir = pathlib.Path(quick_start["workdir"])
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  final = [record for record in records if "eval_bits_per_token" in record][-1]
  assert final["step"] == 30
  assert final["eval_bits_per_token"] >= final["data_entropy_bits_per_token"]
  assert (workdir / "curves.png").is_file() and (workdir / "checkpoints" / "30").is_dir()
  venv = pathlib.Path(quick_start["checkout"]) / ".venv"
  assert (venv / "bin" / "md4-train").is_file()


def test_base_install_is_the_size_the_readme_says(quick_start):
  assert quick_start["returncode"] == 0, quick_start["stderr"]
  readme = " ".join((REPO / "README.md").read_text().split())
  megabytes, packages = map(int, re.search(r"enough for text: (\d+) MB in (\d+) packages",
                                           readme).groups())
  names, size = set(quick_start["packages"]), quick_start["venv_megabytes"]
  # Releases move both a little; a new heavy dependency shows.
  assert "md4" in names and len(names) <= packages + 3, sorted(names)
  assert 0 < size <= 1.1 * megabytes, size
  assert not names & {"tokenizers", "tensorflow", "torch", "wandb", "pyarrow"}


def test_readme_test_command_installs_and_tests(quick_start):
  assert quick_start["returncode"] == 0, quick_start["stderr"]
  readme = (REPO / "README.md").read_text()
  tests_command = helpers.load_benchmark("quickstart").readme_command(readme, "Tests")
  result = _bash(f"{tests_command} {TEST_SELECTION}", pathlib.Path(quick_start["checkout"]),
                 timeout=1200)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "failed" not in result.stdout


def test_built_wheel_carries_the_licence_and_metadata(quick_start, tmp_path):
  assert quick_start["returncode"] == 0, quick_start["stderr"]
  checkout = pathlib.Path(quick_start["checkout"])
  result = _bash(f". .venv/bin/activate && pip wheel --quiet --no-deps -w {tmp_path} .",
                 checkout, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (wheel,) = tmp_path.glob("md4-*.whl")
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = email.parser.Parser().parsestr(
        archive.read(next(name for name in names if name.endswith(".dist-info/METADATA")))
        .decode())
    licence = archive.read(next(name for name in names
                                if name.endswith(".dist-info/licenses/LICENSE"))).decode()
  assert licence == (REPO / "LICENSE").read_text() and "Apache License" in licence
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata["Author"] and metadata.get_all("Project-URL")
  assert "Intended Audience :: Science/Research" in metadata.get_all("Classifier")
