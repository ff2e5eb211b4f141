"""`python -m md4.data.prepare`: the one-off step for each dataset, offline."""

import json
import pathlib
import subprocess
import sys
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from md4 import data as data_lib
from md4 import defaults
from md4.data import alphabet
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(dataset, data_dir="", **options) -> ml_collections.ConfigDict:
  return helpers.data_config(dataset, data_dir=data_dir, seq_len=8, batch_size=4, **options)


def test_text8_reports_the_splits_of_a_local_file(tmp_path):
  (tmp_path / "text8").mkdir()
  with zipfile.ZipFile(tmp_path / "text8" / "text8.zip", "w") as archive:
    archive.writestr("text8", "ab " * 100)
  summary = data_lib.prepare_dataset(_config("text8", data_dir=str(tmp_path), download=False))
  assert summary["characters"] == 300
  assert summary["splits"] == {"train": (0, 270), "validation": (270, 285), "test": (285, 300)}


def test_chars_reports_the_split(tmp_path):
  (tmp_path / "a.txt").write_text("Hello world " * 20)
  summary = data_lib.prepare_dataset(_config("chars", path=str(tmp_path / "a.txt")))
  # 239 characters: 29 chunks of 8, round(2.9) = 3 held out.
  assert summary == {"dataset": "chars", "characters": 239, "train_chunks": 26,
                     "validation_chunks": 3}


def test_tokens_builds_once_from_the_command_line(tmp_path):
  words = np.array("red green blue cyan magenta yellow black white".split())
  rng = np.random.default_rng(0)
  (tmp_path / "corpus.txt").write_text(
      "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(200)))
  helpers.write_tokens_config(tmp_path)
  command = [sys.executable, "-m", "md4.data.prepare", f"--config={tmp_path / 'config.py'}"]
  first = json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                     .stdout.strip().splitlines()[-1])
  assert first["rebuilt"] and first["documents"] == 200 and first["vocab_size"] == 40
  again = json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                     .stdout.strip().splitlines()[-1])
  assert not again["rebuilt"] and again["tokens"] == first["tokens"]


def test_a_data_dir_that_is_a_file_is_one_error_line(tmp_path):
  (tmp_path / "data").write_text("not a folder")
  result = subprocess.run([sys.executable, "-m", "md4.data.prepare", "--config=configs/chars.py",
                           f"--config.data_dir={tmp_path / 'data'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"md4: error: config.data_dir={tmp_path / 'data'} is a file: name a directory for "
      "downloaded and prepared data (it is made if absent)"]


def test_synthetic_reports_the_entropy():
  summary = data_lib.prepare_dataset(_config("synthetic"))
  assert summary["entropy_bits_per_token"] == pytest.approx(
      data_lib.create(_config("synthetic")).entropy_bits_per_token)


def test_images_prepare_both_splits():
  with tfds.testing.mock_data(num_examples=6):
    summary = data_lib.prepare_dataset(_config("cifar10", source="tfds"))
  assert summary == {"dataset": "cifar10", "tfds_name": "cifar10",
                     "examples": {"train": 6, "test": 6}}


def test_alphabet_round_trip_and_errors():
  assert alphabet.decode(alphabet.encode("the quick fox")) == "the quick fox"
  with pytest.raises(ValueError, match="ids must lie in"):
    alphabet.decode(np.array([0, 27]))
  with pytest.raises(ValueError, match="not in the text8 alphabet"):
    alphabet.encode("Upper")


def test_every_source_has_its_options_in_the_defaults_and_unknown_datasets_fail():
  config = defaults.get_config()
  for name, source in data_lib.sources().items():
    assert config[name].to_dict() == dict(source.options)
  config.dataset = "mnist"
  for call in (defaults.validate, data_lib.create, data_lib.prepare_dataset):
    with pytest.raises(ValueError, match="config.dataset='mnist' is not a data source"):
      call(config)
