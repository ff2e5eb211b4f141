"""Input-pipeline throughput on this machine, as one JSON object.

    python benchmarks/input_pipeline.py [--seconds=10] [--only=text8,tokens]

Every pipeline is the training iterator md4.data builds (shuffle, repeat,
shard, batch, read-ahead threads), over in-memory or memory-mapped data of
the real shapes, so nothing needs downloading:
  text8      512 x 256 chunks of a 90M-character array (the text8 train split);
  chars      512 x 256 chunks of the bundled Tiny Shakespeare, normalised;
  tokens     64 x 1024 sequences of a memory-mapped 50M-token uint16 stream;
  images     512 x 32 x 32 x 3 CIFAR-shaped images decoded from PNG per example
             (as a tfds data source without OpenCV does) with random flips;
  synthetic  512 x 256 sequences of the order-1 Markov source of the quick start.
"""

import argparse
import io
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from md4 import defaults
from md4.data import chars
from md4.data import images
from md4.data import pipeline
from md4.data import synthetic


def batches_per_second(iterator, seconds: float) -> tuple[float, int]:
  """(batches/s after one warm-up batch, batches timed)."""
  next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += 1
  return count / (time.perf_counter() - start), count


class PngSource:
  """CIFAR-shaped examples stored as PNG bytes and decoded on every read."""

  def __init__(self, num_examples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.encoded = []
    for _ in range(num_examples):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
      self.encoded.append(buffer.getvalue())
    self.labels = rng.integers(0, 10, num_examples)

  def __len__(self) -> int:
    return len(self.encoded)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image = np.asarray(Image.open(io.BytesIO(self.encoded[index])))
    return {"image": image, "label": self.labels[index]}


def run(name: str, seconds: float, workdir: pathlib.Path) -> dict[str, object]:
  rng = np.random.default_rng(0)
  if name == "text8":
    shape = (512, 256)
    source = pipeline.ChunkSource(rng.integers(0, 27, 90_000_000, dtype=np.uint8), 256)
    iterator = pipeline.train_iterator(source, 512, seed=0)
  elif name == "chars":
    shape = (512, 256)
    source = pipeline.ChunkSource(chars.read_ids(str(chars.BUNDLED_TEXT)), 256)
    iterator = pipeline.train_iterator(source, 512, seed=0)
  elif name == "tokens":
    shape = (64, 1024)
    path = workdir / "tokens.bin"
    rng.integers(0, 32768, 50_000_000, dtype=np.uint16).tofile(path)
    source = pipeline.ChunkSource(np.memmap(path, dtype=np.uint16, mode="r"), 1024)
    iterator = pipeline.train_iterator(source, 64, seed=0)
  elif name == "images":
    shape = (512, 32, 32, 3)
    iterator = pipeline.train_iterator(PngSource(5000), 512, seed=0,
                                       transform=images.to_example,
                                       random_transform=images.random_flip)
  elif name == "synthetic":
    shape = (512, 256)
    config = defaults.get_config()
    config.update(dataset="synthetic", seq_len=256, batch_size=512, seed=0)
    iterator = synthetic.create(config).train
  else:
    raise ValueError(f"unknown pipeline {name!r}")
  rate, count = batches_per_second(iterator, seconds)
  return {"batch_shape": list(shape), "batches_per_s": round(rate, 2), "batches_timed": count}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=10.0, help="timing per pipeline")
  parser.add_argument("--only", default="text8,chars,tokens,images,synthetic",
                      help="comma-separated pipelines to time")
  args = parser.parse_args()
  results = {"cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as workdir:
    for name in args.only.split(","):
      results[name] = run(name, args.seconds, pathlib.Path(workdir))
  print(json.dumps(results))


if __name__ == "__main__":
  main()
