"""The data-source registry: any source from any experiment file on the command line, and a new one."""

import pathlib
import zipfile

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import defaults
from md4 import train
from md4.data import alphabet
from md4.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.seq_len=16", "--config.batch_size=8", "--config.model.width=32",
        "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.dtype=float32", "--config.num_train_steps=2",
        "--config.log_every_steps=1", "--config.eval_every_steps=2", "--config.num_eval_steps=1",
        "--config.checkpoint_every_steps=2", "--config.sample_every_steps=2",
        "--config.sample_steps=4"]


def parse_command_line(*argv: str) -> ml_collections.ConfigDict:
  """The config `python -m md4.main` would build from these flags."""
  flag_values = flags.FlagValues()
  # Override flags (--config.x) are defined from the arguments, as md4.main's are from sys.argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=["md4.main", *argv])
  flag_values(["md4.main", *argv])
  return flag_values.config


def text_source_options(name: str, tmp_path: pathlib.Path) -> list[str]:
  """Flags that point source `name` at small local data."""
  text = alphabet.decode(np.random.default_rng(0).integers(0, 27, 20_000))
  if name == "text8":
    (tmp_path / "text8").mkdir(exist_ok=True)
    with zipfile.ZipFile(tmp_path / "text8" / "text8.zip", "w") as archive:
      archive.writestr("text8", text)
    return [f"--config.data_dir={tmp_path}", "--config.text8.download=False"]
  if name == "chars":
    (tmp_path / "a.txt").write_text(text.title())
    return [f"--config.chars.path={tmp_path / 'a.txt'}", "--config.chars.validation_fraction=0.2"]
  if name == "tokens":
    words = "the cat dog sat on mat and ran far away from home when rain fell".split()
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(300)) + "\n")
    return [f"--config.data_dir={tmp_path}", f"--config.tokens.path={tmp_path / 'corpus.txt'}",
            "--config.tokens.vocab_size=40", "--config.tokens.validation_fraction=0.2"]
  return ["--config.synthetic.num_eval_examples=16", "--config.synthetic.order=2"]


@pytest.mark.parametrize("source", ["text8", "chars", "tokens", "synthetic"])
@pytest.mark.parametrize("experiment", ["quickstart", "genmd4_text8", "prime_text8"])
def test_any_text_source_from_any_experiment_file_trains(experiment, source, tmp_path):
  config = parse_command_line(f"--config={REPO / 'configs' / experiment}.py",
                              f"--config.dataset={source}",
                              *text_source_options(source, tmp_path), *TINY)
  eval_metrics = train.train_and_evaluate(config, tmp_path / "run")
  assert np.isfinite(eval_metrics["eval_bits_per_token"])
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_an_option_of_another_source_is_not_an_error():
  config = parse_command_line(f"--config={REPO / 'configs' / 'quickstart'}.py",
                              "--config.tokens.vocab_size=77", "--config.text8.eval_split=test")
  assert config.dataset == "synthetic" and config.tokens.vocab_size == 77
  defaults.validate(config)


class CountingSource:
  """A test-only source: example i is (i + j) mod modulus at position j."""

  def __init__(self, size: int, length: int, modulus: int):
    self.size, self.length, self.modulus = size, length, modulus

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"x": ((index + np.arange(self.length)) % self.modulus).astype(np.int32)}


def create_counting(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  options = config.counting
  train_split = CountingSource(10_000, config.seq_len, options.modulus)
  held_out = CountingSource(options.num_eval_examples, config.seq_len, options.modulus)
  return data_lib.Dataset(
      train=pipeline.train_iterator(train_split, config.batch_size, config.seed),
      eval_batches=pipeline.eval_iterator_fn(held_out, config.batch_size),
      vocab_size=options.modulus, example_shape=(config.seq_len,),
      decode=lambda ids: " ".join(map(str, np.asarray(ids).reshape(-1))))


@pytest.fixture
def counting_source():
  source = data_lib.register(data_lib.Source(
      "counting", {"modulus": 5, "num_eval_examples": 16}, create_counting,
      lambda config, progress: {"modulus": config.counting.modulus}))
  yield source
  data_lib.unregister("counting")


def test_a_new_source_is_one_registration_away(counting_source, tmp_path):
  assert defaults.get_config().counting.to_dict() == {"modulus": 5, "num_eval_examples": 16}
  config = parse_command_line(f"--config={REPO / 'configs' / 'quickstart'}.py",
                              "--config.dataset=counting", "--config.counting.modulus=7", *TINY)
  assert data_lib.prepare_dataset(config) == {"dataset": "counting", "modulus": 7}
  train.train_and_evaluate(config, tmp_path)
  samples = (tmp_path / "samples" / "step_2.txt").read_text().splitlines()
  assert all(0 <= int(value) < 7 for line in samples for value in line.split())
  with pytest.raises(ValueError, match="already registered"):
    data_lib.register(data_lib.Source("counting", {}, create_counting))
