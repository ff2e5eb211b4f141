"""gs:// workdirs end to end, against a real GCS JSON API server on 127.0.0.1.

The server is gcp-storage-emulator (the project's test extra), started here.
md4 reaches it because STORAGE_EMULATOR_HOST is set, as with Google's own
client libraries; the machine has no other network, so any gs:// request
that went elsewhere would fail the run.
"""

# gcp-storage-emulator leaves out the generation headers of a download, which
# GCS sends and tensorstore reads to revalidate what it cached; added here.
SERVER = """
import sys, time
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects
emulator_download = objects.download
def download(request, response, storage, *args, **kwargs):
  try:
    found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = found["generation"]
    response["x-goog-metageneration"] = found["metageneration"]
  except Exception:  # Not found: the emulator answers 404.
    pass
  return emulator_download(request, response, storage, *args, **kwargs)
objects.download = download
for _, handlers in server.HANDLERS:
  for method, handler in handlers.items():
    if handler is emulator_download:
      handlers[method] = download
server.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True,
                     default_bucket=sys.argv[2]).run()
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.test_reliability import REPO
from tests.test_reliability import TINY
from tests.test_reliability import free_port

pytestmark = pytest.mark.slow
BUCKET = "md4-test"
STEPS = ["--config.num_train_steps=24", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=4", "--config.eval_every_steps=24",
         "--config.sample_every_steps=24"]


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
  """http://127.0.0.1:PORT of an in-memory GCS server holding the bucket md4-test."""
  port = free_port()
  log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")
  server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), BUCKET],
                            stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(url, timeout=1).read()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, "the GCS server did not start"
      time.sleep(0.2)
  yield url
  server.terminate()
  server.wait(timeout=30)
  log.close()


def environment(url: str) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=url,
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def main_command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "md4.main", "--config=configs/quickstart.py",
          f"--workdir={workdir}", *TINY, *STEPS, *overrides]


def objects(url: str, prefix: str) -> list[str]:
  """Names of the bucket's objects under prefix, through the JSON API."""
  query = urllib.parse.urlencode({"prefix": prefix})
  with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}", timeout=10) as reply:
    return [item["name"] for item in json.load(reply).get("items", [])]


def download(url: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe="")
  with urllib.request.urlopen(f"{url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media",
                              timeout=10) as reply:
    return reply.read()


COMPARE = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp
from md4.runtime import storage
storage.use_emulator_if_set()
def params(folder):
  manager = ocp.CheckpointManager(folder, item_names=("state",))
  return manager.restore(24, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"]
jax.tree.map(np.testing.assert_array_equal, params(sys.argv[1]), params(sys.argv[2]))
print("EQUAL")
"""


def test_gs_workdir_trains_resumes_after_sigkill_and_evaluates(gcs_server, tmp_path):
  env = environment(gcs_server)
  local = subprocess.run(main_command(str(tmp_path / "local")), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert local.returncode == 0, local.stderr[-3000:]

  workdir = f"gs://{BUCKET}/runs/one"
  killed = subprocess.Popen(main_command(workdir), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while "runs/one/checkpoints/8/commit_success.txt" not in objects(gcs_server, "runs/one/"):
    assert killed.poll() is None, killed.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint 8 in the bucket"
    time.sleep(0.2)
  killed.send_signal(signal.SIGKILL)
  killed.wait()

  resumed = subprocess.run(main_command(workdir), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  restored_at = int(resumed.stderr.split("Restored checkpoint at step ")[1].split()[0])
  assert 8 <= restored_at < 24

  evaluated = subprocess.run(
      [sys.executable, "-m", "md4.evaluate", f"--workdir={workdir}", "--num_eval_batches=1",
       "--num_t=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f"step 24 of {workdir}" in evaluated.stdout
  results = json.loads(download(gcs_server, "runs/one/eval/results_step_24.json"))
  assert results["nelbo"]["eval"]["bits_per_token"] > results["nelbo"]["eval"][
      "data_entropy_bits_per_token"]

  compare = subprocess.run([sys.executable, "-c", COMPARE, str(tmp_path / "local/checkpoints"),
                            f"{workdir}/checkpoints"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
  assert compare.stdout.strip().endswith("EQUAL"), compare.stderr[-3000:]

  lines = [json.loads(line) for line in download(gcs_server, "runs/one/metrics.jsonl").splitlines()]
  assert [line["step"] for line in lines if "loss" in line] == list(range(1, 25))
  local_lines = [json.loads(line) for line in (tmp_path / "local/metrics.jsonl").open()]
  for ours, theirs in zip([l for l in lines if "loss" in l], [l for l in local_lines if "loss" in l]):
    assert ours["loss"] == theirs["loss"], ours["step"]
  names = objects(gcs_server, "runs/one/")
  assert "runs/one/config.json" in names and "runs/one/md4.lock" not in names
  assert any(name.startswith("runs/one/tensorboard/train/events.out.tfevents.") for name in names)


def test_an_emulator_host_without_scheme_works_through_checkpoint_deletion(gcs_server):
  host = gcs_server.removeprefix("http://")  # As STORAGE_EMULATOR_HOST is often set.
  result = subprocess.run(
      main_command(f"gs://{BUCKET}/runs/schemeless", "--config.num_train_steps=6",
                   "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1",
                   "--config.eval_every_steps=6", "--config.sample_every_steps=6"),
      cwd=REPO, env=environment(host), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  steps = {name.split("/")[3] for name in objects(gcs_server, "runs/schemeless/checkpoints/")}
  assert steps == {"6"}
