"""Configs for tests: the defaults with one data source's options set; benchmark scripts."""

import importlib.util
import pathlib
import types

import ml_collections

from md4 import defaults


def data_config(dataset: str, *, data_dir: str = "", seq_len: int = 16, batch_size: int = 8,
                seed: int = 0, **options) -> ml_collections.ConfigDict:
  """defaults.get_config() reading `dataset`, with config.<dataset> updated by options.

  An option the source does not have fails here, as it would in training.
  """
  config = defaults.get_config()
  config.update(dataset=dataset, data_dir=data_dir, seq_len=seq_len, batch_size=batch_size,
                seed=seed)
  config[dataset].update(options)
  return defaults.validate(config)


def load_benchmark(name: str) -> types.ModuleType:
  """benchmarks/<name>.py as a module (the folder is not a package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_tokens_config(folder: pathlib.Path) -> None:
  """folder/config.py: a 40-piece corpus of folder/corpus.txt, prepared into folder/out."""
  (folder / "config.py").write_text(f"""
from md4 import defaults
def get_config():
  config = defaults.get_config()
  config.update(dataset="tokens", data_dir={str(folder / "out")!r}, seq_len=16, batch_size=4)
  config.tokens.update(path={str(folder / "corpus.txt")!r}, vocab_size=40)
  return config
""")
