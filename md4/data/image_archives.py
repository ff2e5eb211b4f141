"""CIFAR-10 and ImageNet 64x64 from their official archives, without TensorFlow.

The archives, looked for in the source's archive_dir (default
`<config.data_dir>/<dataset>`), each checked against the official file's
size and SHA-256 before it is read:

  cifar10     cifar-10-python.tar.gz (or cifar-10-binary.tar.gz), from
              https://www.cs.toronto.edu/~kriz/cifar.html; the python one is
              downloaded when no archive is there and cifar10.download is on.
              50,000 train / 10,000 test images, 10 classes.
  imagenet64  Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and
              Imagenet64_val_npz.zip: "Downsampled ImageNet 64x64" (Chrabaszcz
              et al., 2017; the files tfds's imagenet_resized/64x64 reads), from
              image-net.org after signing in, so never downloaded here.
              1,281,167 train / 50,000 validation images, 1000 classes.

Prepared into `<config.data_dir>/<dataset>/`, per split (train, and test or
validation): `<split>_images.bin`, uint8 [N, H, W, 3] in row-major order, and
`<split>_labels.bin`, int16 [N] (0-based), both memory-mapped for training;
and manifest.json: the archives' names, sizes, mtimes and SHA-256, and the
splits' shapes, written last, so that a half-done preparation is never taken
for a finished one. The files are reused while the archives match the
manifest (or have been deleted since) and rebuilt when one changed.

CIFAR-10's python batches are pickles: they are read with an unpickler that
builds nothing but dicts, lists, strings, numbers and numpy arrays.
"""

import codecs
import dataclasses
import http.client
import io
import json
import logging
import os
import pathlib
import pickle
import re
import tarfile
import zipfile
from typing import Any, Iterator

import numpy as np

from md4.data import text8
from md4.data import tokenizer as tokenizer_lib
from md4.runtime import progress as progress_lib

MANIFEST = "manifest.json"
_FORMAT_VERSION = 1
_COPY_ROWS = 8192  # Images transposed and written at a time.


@dataclasses.dataclass(frozen=True)
class Archive:
  """An official archive: its file name, size in bytes and SHA-256."""

  name: str
  size: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one dataset's archives hold.

  Attributes:
    choices: alternative sets of archives, any one of which is enough.
    splits: split name -> examples.
    image_size: H = W.
    num_classes: number of labels.
    url: where the first choice's single archive downloads from ("" if it cannot).
  """

  choices: tuple[tuple[Archive, ...], ...]
  splits: dict[str, int]
  image_size: int
  num_classes: int
  url: str = ""


CIFAR10_PYTHON = Archive("cifar-10-python.tar.gz", 170_498_071,
                         "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
CIFAR10_BINARY = Archive("cifar-10-binary.tar.gz", 170_052_171,
                         "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")
IMAGENET64 = (
    Archive("Imagenet64_train_part1_npz.zip", 6_783_426_789,
            "9422dc1dc5d092e9814a70a1cb7fc74880d2db5d88a0cb8a34ee363b12bde3f1"),
    Archive("Imagenet64_train_part2_npz.zip", 6_780_506_068,
            "9fafc115afb7e6c301e66dc16b2d737152b427bd5dab26e1293487a6819c7f30"),
    Archive("Imagenet64_val_npz.zip", 529_522_927,
            "e1e75133158a1924135a9c6f97a80d2d237b158945e0b34074e58e6c8430eeb8"),
)
LAYOUTS = {
    "cifar10": Layout(((CIFAR10_PYTHON,), (CIFAR10_BINARY,)),
                      {"train": 50_000, "test": 10_000}, 32, 10,
                      url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "imagenet64": Layout((IMAGENET64,), {"train": 1_281_167, "validation": 50_000}, 64, 1000),
}

_reconstruct = np._core.multiarray._reconstruct  # pylint: disable=protected-access
# What pickled batches may name: numpy's array rebuilding, and _codecs.encode, which
# Python 3's protocol-2 pickles of bytes call (it only turns a str into bytes).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,
    # numpy.core is numpy 1's name (the official 2009 pickles), numpy._core numpy 2's.
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses any other object."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"a CIFAR-10 batch may not reference {module}.{name}")


def _cifar_python_batch(content: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    batch = _ArraysOnly(io.BytesIO(content), encoding="bytes").load()
    data, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"])
  except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as error:
    raise ValueError(f"{where}: not a CIFAR-10 python batch ({error})") from error
  return data, labels


def _cifar_binary_batch(content: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  # Records of one label byte and 3072 pixel bytes.
  if len(content) % 3073:
    raise ValueError(f"{where}: {len(content)} bytes is not a whole number of CIFAR-10 records")
  records = np.frombuffer(content, np.uint8).reshape(-1, 3073)
  return records[:, 1:], records[:, 0]


def _cifar_batches(path: pathlib.Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(pixels uint8 [n, 3072] channel-major, labels [n]) of a CIFAR-10 tarball's split, in order."""
  binary = path.name == CIFAR10_BINARY.name
  names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"])
  folder = "cifar-10-batches-bin" if binary else "cifar-10-batches-py"
  with tarfile.open(path, "r:gz") as archive:
    for name in names:
      member = f"{folder}/{name}.bin" if binary else f"{folder}/{name}"
      try:
        content = archive.extractfile(member).read()
      except (KeyError, AttributeError) as error:
        raise ValueError(f"{path} has no {member}: not a CIFAR-10 archive") from error
      where = f"{path}/{member}"
      yield (_cifar_binary_batch if binary else _cifar_python_batch)(content, where)


def _batch_order(name: str) -> tuple[int, str]:
  """Sort key of train_data_batch_1.npz .. _10.npz: by number, not as text."""
  digits = re.search(r"(\d+)\.npz$", name)
  return (int(digits.group(1)) if digits else 0, name)


def _imagenet_batches(paths: list[pathlib.Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(pixels uint8 [n, 12288] channel-major, labels [n], 0-based) of the npz zips, in order."""
  for path in paths:
    with zipfile.ZipFile(path) as archive:
      members = sorted((name for name in archive.namelist() if name.endswith(".npz")),
                       key=_batch_order)
      for member in members:
        try:
          with np.load(io.BytesIO(archive.read(member)), allow_pickle=False) as batch:
            pixels, labels = np.asarray(batch["data"], np.uint8), np.asarray(batch["labels"])
        except (KeyError, ValueError, zipfile.BadZipFile) as error:
          raise ValueError(f"{path}/{member}: not a downsampled-ImageNet npz batch "
                           f"({error})") from error
        yield pixels, labels - 1  # The npz labels count from 1.


def _find_archives(name: str, archive_dir: pathlib.Path) -> tuple[Archive, ...] | None:
  """The first complete choice of archives in archive_dir, None if there is none."""
  for choice in LAYOUTS[name].choices:
    if all((archive_dir / archive.name).is_file() for archive in choice):
      return choice
  return None


def _archive_names(name: str) -> str:
  return " or ".join(" + ".join(archive.name for archive in choice)
                     for choice in LAYOUTS[name].choices)


def _stat_key(path: pathlib.Path) -> dict[str, Any]:
  stat = path.stat()
  return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def verify(path: pathlib.Path, archive: Archive) -> str:
  """The SHA-256 of path, checked with its size against the official archive's."""
  size = path.stat().st_size
  if size != archive.size:
    raise ValueError(f"{path} has {size} bytes, the official {archive.name} {archive.size}: "
                     "a partial or different file; download it again")
  sha256 = tokenizer_lib.file_sha256(path)
  if sha256 != archive.sha256:
    raise ValueError(f"{path} has SHA-256 {sha256}, the official {archive.name} "
                     f"{archive.sha256}: download it again")
  return sha256


def read_manifest(folder: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads((folder / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def is_current(manifest: dict[str, Any] | None, folder: pathlib.Path,
                archive_dir: pathlib.Path) -> bool:
  """Whether the prepared files are whole and no archive changed since (deleted is fine)."""
  if manifest is None or manifest.get("format_version") != _FORMAT_VERSION:
    return False
  try:
    for split, shape in manifest["splits"].items():
      if ((folder / f"{split}_images.bin").stat().st_size != int(np.prod(shape))
          or (folder / f"{split}_labels.bin").stat().st_size != 2 * shape[0]):
        return False
    for recorded in manifest["archives"]:
      path = archive_dir / recorded["name"]
      if path.exists() and _stat_key(path) != {key: recorded[key] for key in
                                               ("name", "size", "mtime_ns")}:
        return False
  except (OSError, KeyError, TypeError):
    return False
  return True


def _write_split(batches: Iterator[tuple[np.ndarray, np.ndarray]], size: int, examples: int,
                 num_classes: int, images_path: pathlib.Path, labels_path: pathlib.Path,
                 where: str) -> None:
  """Writes a split's images as uint8 [N, H, W, 3] and labels as int16 [N]."""
  written = 0
  with (open(images_path, "wb") as images, open(labels_path, "wb") as labels,
        progress_lib.bar(examples, where, "image", unit_scale=True) as bar):
    for pixels, classes in batches:
      if pixels.ndim != 2 or pixels.shape[1] != 3 * size * size or len(classes) != len(pixels):
        raise ValueError(f"{where}: a batch of shape {pixels.shape} with {len(classes)} labels, "
                         f"expected [n, {3 * size * size}] and n labels")
      if len(classes) and not 0 <= classes.min() <= classes.max() < num_classes:
        raise ValueError(f"{where}: labels outside [0, {num_classes})")
      for start in range(0, len(pixels), _COPY_ROWS):
        rows = pixels[start:start + _COPY_ROWS].reshape(-1, 3, size, size)
        np.ascontiguousarray(rows.transpose(0, 2, 3, 1)).tofile(images)
      classes.astype(np.int16).tofile(labels)
      written += len(pixels)
      bar.update(len(pixels))
  if written != examples:
    raise ValueError(f"{where} holds {written} images, the official split {examples}")


def prepare(name: str, folder: pathlib.Path, archive_dir: pathlib.Path, *,
            download: bool = False) -> dict[str, Any]:
  """The manifest of `name` prepared in folder, converting the archives first if needed."""
  layout = LAYOUTS[name]
  manifest = read_manifest(folder)
  if is_current(manifest, folder, archive_dir):
    return manifest
  choice = _find_archives(name, archive_dir)
  if choice is None and download and layout.url:
    logging.info("Downloading %s to %s", layout.url, archive_dir)
    first = layout.choices[0][0]
    try:
      text8.download(layout.url, archive_dir / first.name, size=first.size, sha256=first.sha256)
    except (OSError, ValueError, http.client.HTTPException) as error:
      raise FileNotFoundError(
          f"no {name} archive in {archive_dir} and downloading {layout.url} failed ({error}). "
          f"Put {first.name} ({first.size} bytes, SHA-256 {first.sha256}) at "
          f"{archive_dir / first.name}, then run the command again") from error
    choice = layout.choices[0]
  if choice is None:
    how = (f"download {layout.url} there, or set {name}.download=True" if layout.url
           else "download them from image-net.org (Downsampled ImageNet 64x64, npz)")
    raise FileNotFoundError(f"no {name} archives in {archive_dir}: expected {_archive_names(name)}"
                            f"; {how} (docs/data.md), then run "
                            "`python -m md4.data.prepare --config=...`")
  paths = [archive_dir / archive.name for archive in choice]
  logging.info("Preparing %s from %s into %s", name, ", ".join(map(str, paths)), folder)
  archives = [{**_stat_key(path), "sha256": verify(path, archive)}
              for path, archive in zip(paths, choice)]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / MANIFEST).unlink(missing_ok=True)
  splits = {}
  for split, examples in layout.splits.items():
    if name == "cifar10":
      batches = _cifar_batches(paths[0], split)
    else:  # The last zip holds the validation split, the others the training one.
      batches = _imagenet_batches(paths[:-1] if split == "train" else paths[-1:])
    parts = folder / f"{split}_images.bin.part", folder / f"{split}_labels.bin.part"
    _write_split(batches, layout.image_size, examples, layout.num_classes, *parts,
                 where=f"{name} {split}")
    os.replace(parts[0], folder / f"{split}_images.bin")
    os.replace(parts[1], folder / f"{split}_labels.bin")
    splits[split] = [examples, layout.image_size, layout.image_size, 3]
  manifest = {"format_version": _FORMAT_VERSION, "dataset": name, "archives": archives,
              "splits": splits, "num_classes": layout.num_classes}
  part = folder / (MANIFEST + ".part")
  part.write_text(json.dumps(manifest, indent=2))
  os.replace(part, folder / MANIFEST)
  return manifest


class ArraySource:
  """A prepared split as a random-access source of {"image": uint8 [H, W, 3], "label": int}."""

  def __init__(self, folder: pathlib.Path, split: str, manifest: dict[str, Any]):
    if split not in manifest["splits"]:
      raise ValueError(f"split {split!r} is not prepared in {folder}; prepared: "
                       f"{', '.join(manifest['splits'])}")
    shape = tuple(manifest["splits"][split])
    self.images = np.memmap(folder / f"{split}_images.bin", np.uint8, "r", shape=shape)
    self.labels = np.memmap(folder / f"{split}_labels.bin", np.int16, "r", shape=shape[:1])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": np.asarray(self.images[index]), "label": np.asarray(self.labels[index])}
