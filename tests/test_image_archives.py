"""CIFAR-10 and ImageNet 64x64 from archives in the official formats, written small here.

The archives hold few images, so the tests register their sizes and SHA-256
in place of the official ones (`official`); everything else runs as it
would on the real files, offline and without TensorFlow.
"""

import dataclasses
import io
import os
import pathlib
import pickle
import re
import socket
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from md4 import data as data_lib
from md4.data import image_archives
from md4.data import tokenizer as tokenizer_lib
from tests import helpers

CIFAR_SPLITS = {"train": 5 * 3, "test": 4}
IMAGENET_SPLITS = {"train": 10 * 2, "validation": 4}


def channel_major(images: np.ndarray) -> np.ndarray:
  """[n, H, W, 3] -> the archives' rows [n, 3 * H * W]: all of R, then G, then B."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def random_images(count: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _add(archive: tarfile.TarFile, name: str, content: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(content)
  archive.addfile(info, io.BytesIO(content))


def write_cifar10(path: pathlib.Path, images: dict[str, np.ndarray],
                  labels: dict[str, np.ndarray], binary: bool = False) -> pathlib.Path:
  """A cifar-10-python.tar.gz (pickled batches) or cifar-10-binary.tar.gz, in their layout."""
  folder = "cifar-10-batches-bin" if binary else "cifar-10-batches-py"
  batches = [(f"data_batch_{i + 1}", part, part_labels) for i, (part, part_labels) in
             enumerate(zip(np.split(images["train"], 5), np.split(labels["train"], 5)))]
  batches.append(("test_batch", images["test"], labels["test"]))
  with tarfile.open(path, "w:gz") as archive:
    for name, part, part_labels in batches:
      if binary:
        records = np.concatenate([part_labels[:, None].astype(np.uint8), channel_major(part)], 1)
        _add(archive, f"{folder}/{name}.bin", records.tobytes())
      else:
        batch = {b"batch_label": name.encode(), b"labels": part_labels.tolist(),
                 b"data": channel_major(part), b"filenames": [b"x.png"] * len(part)}
        _add(archive, f"{folder}/{name}", pickle.dumps(batch, protocol=2))
    _add(archive, f"{folder}/readme.html", b"<html></html>")
  return path


def write_imagenet64(folder: pathlib.Path, images: dict[str, np.ndarray],
                     labels: dict[str, np.ndarray]) -> list[pathlib.Path]:
  """The three npz zips: train batches 1-5 and 6-10, and val_data; labels 1-based."""

  def npz(part, part_labels, **extra) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, data=channel_major(part), labels=(part_labels + 1).tolist(), **extra)
    return buffer.getvalue()

  parts = list(zip(np.split(images["train"], 10), np.split(labels["train"], 10)))
  paths = []
  for archive, numbers in ((image_archives.IMAGENET64[0], range(1, 6)),
                           (image_archives.IMAGENET64[1], range(6, 11))):
    paths.append(folder / archive.name)
    with zipfile.ZipFile(paths[-1], "w") as zipped:
      for number in reversed(numbers):  # Out of order in the zip: read by number.
        zipped.writestr(f"train_data_batch_{number}.npz",
                        npz(*parts[number - 1], mean=np.zeros(12288)))
  paths.append(folder / image_archives.IMAGENET64[2].name)
  with zipfile.ZipFile(paths[-1], "w") as zipped:
    zipped.writestr("val_data.npz", npz(images["validation"], labels["validation"]))
  return paths


def official(monkeypatch, name: str, paths: list[pathlib.Path], splits: dict[str, int]):
  """Registers the archives at paths (size, SHA-256) and the split sizes as the official ones."""
  layout = image_archives.LAYOUTS[name]
  by_name = {path.name: image_archives.Archive(path.name, path.stat().st_size,
                                               tokenizer_lib.file_sha256(path))
             for path in paths}
  choices = tuple(tuple(by_name.get(archive.name, archive) for archive in choice)
                  for choice in layout.choices)
  monkeypatch.setitem(image_archives.LAYOUTS, name,
                      dataclasses.replace(layout, choices=choices, splits=splits))


def split_data(splits: dict[str, int], size: int, num_classes: int):
  """({split: random images [n, size, size, 3]}, {split: labels [n]})."""
  images = {split: random_images(count, size, i) for i, (split, count) in
            enumerate(splits.items())}
  labels = {split: np.random.default_rng(9).integers(0, num_classes, count)
            for split, count in splits.items()}
  return images, labels


def cifar10_data():
  return split_data(CIFAR_SPLITS, 32, 10)


def imagenet64_data():
  return split_data(IMAGENET_SPLITS, 64, 1000)


def prepared_cifar10(monkeypatch, data_dir: pathlib.Path, binary: bool = False):
  """cifar10 archives written under data_dir/cifar10, registered official; (images, labels)."""
  images, labels = cifar10_data()
  (data_dir / "cifar10").mkdir(parents=True)
  name = (image_archives.CIFAR10_BINARY if binary else image_archives.CIFAR10_PYTHON).name
  path = write_cifar10(data_dir / "cifar10" / name, images, labels, binary)
  official(monkeypatch, "cifar10", [path], CIFAR_SPLITS)
  return images, labels


def prepared_imagenet64(monkeypatch, data_dir: pathlib.Path):
  images, labels = imagenet64_data()
  (data_dir / "imagenet64").mkdir(parents=True)
  paths = write_imagenet64(data_dir / "imagenet64", images, labels)
  official(monkeypatch, "imagenet64", paths, IMAGENET_SPLITS)
  return images, labels


def _config(dataset: str, data_dir, batch_size: int = 4, **options):
  return helpers.data_config(dataset, data_dir=str(data_dir), batch_size=batch_size, **options)


@pytest.fixture
def no_tensorflow(monkeypatch):
  """Importing tensorflow or tensorflow_datasets fails while the test runs."""
  for module in ("tensorflow", "tensorflow_datasets"):
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("binary", [False, True])
def test_cifar10_archive_prepares_into_the_arrays_training_reads(tmp_path, monkeypatch,
                                                                 no_tensorflow, binary):
  images, labels = prepared_cifar10(monkeypatch, tmp_path, binary)
  summary = data_lib.prepare_dataset(_config("cifar10", tmp_path), progress=False)
  assert summary == {"dataset": "cifar10", "folder": str(tmp_path / "cifar10"),
                     "examples": CIFAR_SPLITS}
  dataset = data_lib.create(_config("cifar10", tmp_path))
  assert (dataset.vocab_size, dataset.example_shape, dataset.num_classes) == (256, (32, 32, 3),
                                                                             10)
  # The held-out split in order, pixel for pixel, with its labels.
  (batch,) = list(dataset.eval_batches())
  np.testing.assert_array_equal(batch["x"], images["test"])
  np.testing.assert_array_equal(batch["label"], labels["test"])
  # One epoch of training batches: every image once, with its own label.
  by_image = {image.tobytes(): label for image, label in zip(images["train"], labels["train"])}
  seen = []
  for _ in range(CIFAR_SPLITS["train"] // 4):
    batch = next(dataset.train)
    assert batch["x"].dtype == np.int32 and batch["x"].shape == (4, 32, 32, 3)
    for image, label in zip(batch["x"].astype(np.uint8), batch["label"]):
      assert by_image[image.tobytes()] == label
      seen.append(image.tobytes())
  assert len(set(seen)) == len(seen) == CIFAR_SPLITS["train"] // 4 * 4


def test_imagenet64_npz_zips_prepare_in_batch_order(tmp_path, monkeypatch, no_tensorflow):
  images, labels = prepared_imagenet64(monkeypatch, tmp_path)
  data_lib.prepare_dataset(_config("imagenet64", tmp_path), progress=False)
  manifest = image_archives.read_manifest(tmp_path / "imagenet64")
  assert manifest["splits"] == {"train": [20, 64, 64, 3], "validation": [4, 64, 64, 3]}
  for split in IMAGENET_SPLITS:
    source = image_archives.ArraySource(tmp_path / "imagenet64", split, manifest)
    np.testing.assert_array_equal(source.images, images[split])  # Batch 10 last, not third.
    np.testing.assert_array_equal(source.labels, labels[split])  # 0-based.
  dataset = data_lib.create(_config("imagenet64", tmp_path))
  assert dataset.num_classes == 1000 and dataset.example_shape == (64, 64, 3)
  np.testing.assert_array_equal(next(dataset.eval_batches())["x"], images["validation"])


def test_archives_must_be_the_official_files(tmp_path, monkeypatch):
  images, labels = cifar10_data()
  (tmp_path / "cifar10").mkdir()
  path = write_cifar10(tmp_path / "cifar10" / "cifar-10-python.tar.gz", images, labels)
  config = _config("cifar10", tmp_path, download=False)
  with pytest.raises(ValueError, match="the official cifar-10-python.tar.gz 170498071"):
    data_lib.prepare_dataset(config)
  # The right size, other bytes: the SHA-256 tells.
  layout = image_archives.LAYOUTS["cifar10"]
  wrong = image_archives.Archive(path.name, path.stat().st_size, "0" * 64)
  monkeypatch.setitem(image_archives.LAYOUTS, "cifar10", dataclasses.replace(
      layout, choices=((wrong,),), splits=CIFAR_SPLITS))
  with pytest.raises(ValueError, match="has SHA-256 .*download it again"):
    data_lib.prepare_dataset(config)
  assert not (tmp_path / "cifar10" / image_archives.MANIFEST).exists()
  path.unlink()
  monkeypatch.undo()
  with pytest.raises(FileNotFoundError, match="expected cifar-10-python.tar.gz or "
                                              "cifar-10-binary.tar.gz"):
    data_lib.create(config)
  with pytest.raises(FileNotFoundError, match="Imagenet64_train_part1_npz.zip \\+ "
                                              ".*image-net.org"):
    data_lib.prepare_dataset(_config("imagenet64", tmp_path))


def test_a_pickle_that_builds_other_objects_is_refused(tmp_path, monkeypatch):
  (tmp_path / "cifar10").mkdir()
  path = tmp_path / "cifar10" / "cifar-10-python.tar.gz"

  class Exploit:
    def __reduce__(self):
      return (os.system, ("true",))

  with tarfile.open(path, "w:gz") as archive:
    _add(archive, "cifar-10-batches-py/data_batch_1", pickle.dumps({b"data": Exploit()}))
  official(monkeypatch, "cifar10", [path], CIFAR_SPLITS)
  with pytest.raises(ValueError, match="may not reference (posix|os).system"):
    data_lib.prepare_dataset(_config("cifar10", tmp_path))


def test_prepared_arrays_are_reused_until_an_archive_changes(tmp_path, monkeypatch):
  prepared_cifar10(monkeypatch, tmp_path)
  config = _config("cifar10", tmp_path)
  data_lib.prepare_dataset(config)
  images = tmp_path / "cifar10" / "train_images.bin"
  stamp = images.stat().st_mtime_ns
  data_lib.prepare_dataset(config)
  assert images.stat().st_mtime_ns == stamp
  archive = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
  moved = archive.rename(tmp_path / archive.name)  # Archives deleted after preparing: fine.
  next(data_lib.create(config).train)
  moved.rename(archive)
  os.utime(archive, ns=(stamp, stamp + 10**9))  # The archive changed since: rebuilt.
  data_lib.prepare_dataset(config)
  assert images.stat().st_mtime_ns != stamp
  images.write_bytes(b"truncated")
  data_lib.prepare_dataset(config)
  assert images.stat().st_size == 15 * 32 * 32 * 3


def test_options_choose_the_source():
  config = _config("cifar10", "/nowhere", source="tfds")
  assert config.cifar10.source == "tfds" and config.imagenet64.source == "archive"
  with pytest.raises(ValueError, match="cifar10.source must be one of"):
    data_lib.create(_config("cifar10", "/nowhere", source="web"))
  with pytest.raises(ValueError, match="unknown config key 'imagenet64.download'"):
    _config("imagenet64", "/nowhere", download=True)


def test_a_failed_download_says_which_file_to_put_where(tmp_path, monkeypatch):
  with socket.socket() as unused:  # A port nothing listens on: the download is refused at once.
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
  layout = image_archives.LAYOUTS["cifar10"]
  monkeypatch.setitem(image_archives.LAYOUTS, "cifar10", dataclasses.replace(
      layout, url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"))
  first = layout.choices[0][0]
  expected = (f"Put cifar-10-python.tar.gz ({first.size} bytes, SHA-256 {first.sha256}) at "
              f"{tmp_path / 'cifar10' / 'cifar-10-python.tar.gz'}")
  with pytest.raises(FileNotFoundError, match=re.escape(expected)):
    data_lib.prepare_dataset(_config("cifar10", tmp_path, download=True))
  assert list((tmp_path / "cifar10").iterdir()) == []
