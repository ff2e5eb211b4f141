"""md4.load: docs/notebook.md's example runs silently; sample, decode and nelbo as documented."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import md4
from md4 import train
from tests.test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("notebook")
  train.train_and_evaluate(tiny_config(seq_len=32, num_train_steps=2, eval_every_steps=2,
                                       sample_every_steps=2, num_samples=3), path)
  return path


def test_the_documented_example_runs_and_logs_nothing(workdir):
  [example] = re.findall(r"```python\n(.*?)```", (REPO / "docs/notebook.md").read_text(),
                         re.DOTALL)
  assert len(example.splitlines()) <= 10
  # JAX imported first: Orbax's debug log once came through then (issue 29).
  code = "import jax\n" + example.replace("/tmp/md4_quickstart", str(workdir))
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr == ""
  lines = result.stdout.splitlines()
  assert len(lines[0]) == 32 and len(lines) >= 6


def test_defaults_come_from_the_workdir_config(workdir):
  model = md4.load(workdir)
  assert model.step == 2
  tokens = model.sample()
  assert tokens.shape == (3, 32) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, model.sample(seed=0))
  assert not np.array_equal(tokens, model.sample(seed=1))


def test_nelbo_of_texts_is_that_of_their_windows(workdir):
  model = md4.load(workdir)
  tokens = model.sample(4, steps=8)
  texts = model.decode(tokens)
  bits = model.nelbo(texts, num_t=2)
  np.testing.assert_allclose(bits, model.nelbo(tokens, num_t=2))
  assert bits.shape == (4,) and np.all(bits > 0)
  # Two windows and a left-over token: the mean of its windows' bounds.
  joined = model.nelbo([texts[0] + texts[1] + texts[2][0]], num_t=2)
  np.testing.assert_allclose(joined, [bits[:2].mean()])


@pytest.mark.parametrize("data, message", [
    ("too short", "text 0 makes 9 tokens, fewer than the model's seq_len=32"),
    (["a" * 32, "é" * 40], "text 1: "),
    (np.zeros((2, 31), np.int32), "nelbo takes token ids [N, 32]; got int32 (2, 31)"),
    (np.full((2, 32), 99, np.int32), "token ids must be in [0, "),
])
def test_bad_input_is_one_clear_error(workdir, data, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    md4.load(workdir).nelbo(data)
