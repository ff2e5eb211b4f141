"""A run's life from the first batch to its summary: memory, SIGTERM anywhere, resuming the end.

Each end-to-end test runs `python -m md4.main`, `md4.evaluate` or
`md4.data.prepare` in a subprocess, as a user or a cluster would.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from md4 import defaults
from md4 import memory
from md4 import restored
from md4.data import alphabet
from md4.runtime.errors import PREEMPTED_EXIT_CODE
from tests import helpers
from tests.test_reliability import environment
from tests.test_reliability import main_command
from tests.test_reliability import REPO
from tests.test_reliability import run

GiB = 2**30


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("md4: error: ")]


def wait_until(condition, process: subprocess.Popen, log: pathlib.Path, timeout: float = 240):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, log.read_text()[-3000:]
    assert time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.1)


def start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
  """command with stderr to log, which the test reads while it runs."""
  return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                          stderr=log.open("w"), text=True)


def test_first_step_estimate_counts_batches_activations_and_scores():
  config = defaults.get_config()
  config.update(seq_len=100, batch_size=8, loss_chunk_size=0)
  config.model.update(width=16, num_layers=3, num_heads=2, dtype="float32", backbone="transformer")
  needs = memory.first_step(config, (100,), 27, rows_per_device=4, local_rows=8, attention="xla")
  # Nine batches of 8 x 100 int32 ids; 4 rows of 3 layer inputs [100, 16], logits [100, 28]
  # and one layer's scores [2, 100, 100], all 4 bytes.
  assert needs == {"batches": 9 * 8 * 100 * 4,
                   "activations": 4 * 4 * (3 * 100 * 16 + 100 * 28 + 2 * 100 * 100)}
  config.loss_chunk_size = 10  # Logits of 10 positions at a time; cuDNN keeps no scores.
  needs = memory.first_step(config, (100,), 27, rows_per_device=4, local_rows=8,
                            attention="cudnn")
  assert needs["activations"] == 4 * 4 * (3 * 100 * 16 + 10 * 28)


def test_check_names_the_keys_of_the_largest_term_and_what_there_is():
  config = defaults.get_config()
  config.seq_len = 10_000_000
  cpu = memory.Memory(host_bytes=16 * GiB, device_bytes=None, devices_per_host=2,
                      device_kind="cpu")
  with pytest.raises(ValueError) as raised:  # CPU devices share the host's memory.
    memory.check(config, {"batches": GiB, "activations": 10 * GiB}, cpu, ("seq_len", "batch_size"))
  assert str(raised.value) == (
      "the first training step needs about 21.0 GiB per host (its 2 cpu device(s) share its "
      "memory) (first batch and those read ahead 1.0 GiB, activations 20.0 GiB), more than its "
      "16.0 GiB: lower config.seq_len=10000000 or config.batch_size=32")
  memory.check(config, {"batches": GiB, "activations": 7 * GiB}, cpu, ("seq_len",))
  gpu = memory.Memory(host_bytes=64 * GiB, device_bytes=8 * GiB, devices_per_host=8,
                      device_kind="NVIDIA H100")
  with pytest.raises(ValueError, match=r"about 9\.0 GiB per NVIDIA H100 device .*config\.model"
                                       r"\.width=128 or config\.model\.num_layers=2"):
    memory.check(config, {"batches": GiB, "activations": GiB, "state": 8 * GiB}, gpu, ("seq_len",))
  memory.check(config, {"batches": GiB, "activations": GiB, "state": 6 * GiB}, gpu, ("seq_len",))
  with pytest.raises(ValueError, match=r"per host .*first batch and those read ahead 65\.0 GiB"):
    memory.check(config, {"batches": 65 * GiB, "activations": GiB}, gpu, ("seq_len",))


@pytest.mark.slow
def test_a_first_step_too_big_for_memory_is_refused_before_it_is_built(tmp_path):
  result = run(main_command(tmp_path / "run", "--config.seq_len=10000000"))
  assert result.returncode == 1, result.stderr[-3000:]
  (error,) = error_lines(result.stderr)
  assert "config.seq_len=10000000" in error and "more than its" in error and "GiB" in error
  assert "Traceback" not in result.stderr
  assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
  assert not any((tmp_path / "run").iterdir())  # Refused before the first write.


@pytest.mark.slow
def test_sigterm_while_reading_the_first_batch_exits_at_once(tmp_path):
  # 2**18 sequences of the Python-drawn Markov chain: the first batch takes minutes.
  log = tmp_path / "stderr.log"
  workdir = tmp_path / "run"
  process = start(main_command(workdir, "--config.batch_size=262144",
                               "--config.synthetic.num_eval_examples=262144"), log)
  wait_until(lambda: "Training md4 on synthetic from step 0" in log.read_text(), process, log)
  time.sleep(3)
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=15)
  assert process.returncode == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
  last = log.read_text().strip().splitlines()[-1]
  assert last.startswith("md4: Preempted while reading a batch"), last
  assert not (workdir / "md4.lock").exists()
  assert not list((workdir / "checkpoints").glob("*"))  # Step 0: nothing to save.


@pytest.mark.slow
def test_sigterm_while_preparing_exits_at_once_leaving_no_corpus_taken_for_whole(tmp_path):
  words = np.array("red green blue cyan magenta yellow black white".split())
  rng = np.random.default_rng(0)
  lines = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(2000)) + "\n"
  (tmp_path / "corpus.txt").write_text(lines * 400)  # 56 MB: tens of seconds to prepare.
  helpers.write_tokens_config(tmp_path)
  log = tmp_path / "stderr.log"
  process = start([sys.executable, "-m", "md4.data.prepare", f"--config={tmp_path / 'config.py'}"],
                  log)
  wait_until(lambda: "Preparing the token corpus" in log.read_text(), process, log)
  time.sleep(3)
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=15)
  assert process.returncode == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
  assert log.read_text().strip().splitlines()[-1].startswith(
      "md4: Preempted while preparing data")
  (folder,) = (tmp_path / "out" / "tokens").iterdir()
  assert not (folder / "manifest.json").exists()  # What marks a corpus whole: a re-run rebuilds.
  assert sorted(path.name for path in tmp_path.iterdir()) == [
      "config.py", "corpus.txt", "out", "stderr.log"]


def summary(stdout: str) -> list[str]:
  return [line for line in stdout.splitlines() if line]


@pytest.mark.slow
def test_sigterm_in_the_final_scores_is_finished_by_the_rerun_and_a_finished_run_reprints(
    tmp_path):
  # 8192 quality samples: seconds of sampling after the last evaluation's line.
  command = main_command(tmp_path, "--config.num_train_steps=2",
                         "--config.num_quality_samples=8192")
  log = tmp_path.parent / f"{tmp_path.name}.log"
  process = start(command, log)
  metrics = tmp_path / "metrics.jsonl"
  wait_until(lambda: metrics.exists() and "eval_bits_per_token" in metrics.read_text(),
             process, log)
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=15)
  assert process.returncode == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
  assert log.read_text().strip().splitlines()[-1].startswith("md4: Preempted while sampling")
  assert not (tmp_path / "samples").exists()
  evaluation = metrics.read_text()

  resumed = run(command)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  lines = summary(resumed.stdout)
  assert lines[0].startswith("held-out NELBO: ") and lines[1].startswith("8192 samples vs")
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert metrics.read_text().startswith(evaluation)  # The evaluation is not redone.
  assert sum("eval_bits_per_token" in record for record in records) == 1
  assert sum("samples/kl" in record for record in records) == 1
  assert (tmp_path / "samples" / "step_2.npy").exists()
  assert (tmp_path / "curves.png").exists()

  finished = metrics.read_text()
  again = run(command)
  assert again.returncode == 0, again.stderr[-3000:]
  assert summary(again.stdout) == lines
  assert metrics.read_text() == finished
  assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == [
      "step_2.npy", "step_2.txt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("trained")
  result = run(main_command(workdir, "--config.num_train_steps=2"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_an_infill_character_is_named_at_its_offset_in_the_template():
  checkpoint = types.SimpleNamespace(
      dataset=types.SimpleNamespace(encode=alphabet.encode_prompt),
      model=types.SimpleNamespace(num_tokens=16), config=None)
  with pytest.raises(ValueError, match=r"^infill: character 'é' at offset 6 is not"):
    restored.infill_template(checkpoint, "the __é")
  ids, given = restored.infill_template(checkpoint, "a_b")
  assert ids[:3].tolist() == [0, 0, 1] and given[:4].tolist() == [True, False, True, False]


@pytest.mark.slow
def test_evaluate_names_a_bad_infill_character_at_its_offset(trained):
  result = run([sys.executable, "-m", "md4.evaluate", f"--workdir={trained}", "--nonelbo",
                "--sample", "--infill=the __é"])
  assert result.returncode == 1
  assert error_lines(result.stderr) == [
      "md4: error: infill: character 'é' at offset 6 is not in the text8 alphabet "
      "'abcdefghijklmnopqrstuvwxyz '"]
  assert not (trained / "eval").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--nonelbo", "--sample", "--num_samples=0"], "num_samples must be >= 1, got 0"),
    (["--top_p=2"], "top_p must be in (0, 1], got 2.0"),
    (["--sampler=nope"], "sampler='nope'; valid: "),
    (["--sampler=blocks", '--sampler_options={"q": 1}'], "sampler 'blocks' has no option q"),
    (["--text_file=a", "--zero_shot=lambada:b"], "give text_file or zero_shot, not both"),
    (["--zero_shot=nope:b"], "zero_shot: unknown set 'nope'"),
    (["--num_t=0"], "num_t must be an int >= 1, got 0"),
    (["--judge_convention=nope"], "judge convention='nope'"),
])
def test_evaluate_checks_flags_before_restoring_the_checkpoint(trained, flags, message):
  result = run([sys.executable, "-m", "md4.evaluate", f"--workdir={trained}", *flags])
  assert result.returncode == 1
  (error,) = error_lines(result.stderr)
  assert message in error, error
  assert "orbax" not in result.stderr and "Restored" not in result.stderr
  assert not (trained / "eval").exists()
