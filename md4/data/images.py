"""Images: CIFAR-10 and ImageNet 64x64, from the official archives or from tfds.

Each pixel channel is a token in 0..255: examples are "x" int32 [H, W, 3]
and, when the dataset has labels, "label" int32 (for class conditioning).

  cifar10     50k train / 10k test, 32x32, 10 classes.
  imagenet64  Downsampled ImageNet 64x64 (Chrabaszcz et al.): 1.28M train /
              50k validation, 1000 classes.

The source's `source` option picks where the pixels come from:
  "archive"   the official archives, converted once into memory-mapped arrays
              under `<config.data_dir>/<dataset>` (`md4.data.image_archives`;
              no TensorFlow). `python -m md4.data.prepare --config=...` does it,
              and so does the first single-process training run.
  "tfds"      tensorflow-datasets data sources in array_record format under
              tfds_data_dir (tfds's default folder when empty): reading needs
              no TensorFlow, preparing (`md4.data.prepare`) does (the `tfds`
              extra). tfds_name may name another dataset, e.g.
              "downsampled_imagenet/64x64" (van den Oord et al.; no labels),
              the ImageNet-64 of the MD4 reference.
"""

import pathlib

import jax
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import image_archives
from md4.data import pipeline

SOURCES = ("archive", "tfds")


def _options(tfds_name: str, eval_split: str, **extra) -> dict[str, object]:
  return {
      "source": "archive",      # archive: the official archives (no TensorFlow); tfds.
      "archive_dir": "",        # Where the archives are; empty: <config.data_dir>/<dataset>.
      **extra,
      "tfds_name": tfds_name,   # Another tfds dataset of [H, W, 3] images may stand in.
      "tfds_data_dir": "",      # Empty: tfds's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      "train_split": "train",
      "eval_split": eval_split,
      "random_flip": False,     # Flip training images left-right with probability 1/2.
  }


def load_split(name: str, split: str, data_dir: str | None, *, download: bool = False):
  """tfds.data_source for one split; a clear FileNotFoundError when it is not prepared."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"image datasets need tensorflow-datasets, which md4 installs only with its images "
        f"extra: pip install 'md4[images]' (or -e '.[images]' in a checkout) ({error})"
    ) from error
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as error:
    where = data_dir or "tfds's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    raise FileNotFoundError(
        f"tfds dataset {name!r} split {split!r} is not prepared in array_record format "
        f"under {where}: run `python -m md4.data.prepare --config=...` once, or point "
        f"the source's tfds_data_dir option at a tfds data_dir that holds it ({error})"
    ) from error


def to_example(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A tfds element to {"x": int32 [H, W, 3], "label": int32 [] when labelled}."""
  example = {"x": np.asarray(element["image"], dtype=np.int32)}
  if "label" in element:
    example["label"] = np.asarray(element["label"], dtype=np.int32)
  return example


def random_flip(element: dict[str, np.ndarray], rng: np.random.Generator
                ) -> dict[str, np.ndarray]:
  """Flips the image left-right with probability 1/2."""
  if rng.random() < 0.5:
    element = {**element, "image": np.asarray(element["image"])[:, ::-1]}
  return element


def _num_classes(source) -> int:
  features = source.dataset_info.features
  return int(features["label"].num_classes) if "label" in features else 0


def _folders(config: ml_collections.ConfigDict) -> tuple[pathlib.Path, pathlib.Path]:
  """(prepared folder, archive folder) of config.dataset's archives."""
  folder = pathlib.Path(config.data_dir).expanduser() / config.dataset
  archive_dir = data_lib.options(config).archive_dir
  return folder, pathlib.Path(archive_dir).expanduser() if archive_dir else folder


def _prepare_archives(config: ml_collections.ConfigDict, allow_build: bool
                      ) -> dict[str, object]:
  folder, archive_dir = _folders(config)
  manifest = image_archives.read_manifest(folder)
  if not allow_build and not image_archives.is_current(manifest, folder, archive_dir):
    raise FileNotFoundError(f"{folder} holds no prepared {config.dataset}; run "
                            "`python -m md4.data.prepare --config=...` once before a "
                            "multi-process job")
  return image_archives.prepare(config.dataset, folder, archive_dir,
                                download=data_lib.options(config).get("download", False))


def _source(config: ml_collections.ConfigDict) -> str:
  """config.dataset's source option, checked."""
  source = data_lib.options(config).source
  if source not in SOURCES:
    raise ValueError(f"{config.dataset}.source must be one of {SOURCES}, got {source!r}")
  return source


def _splits(config: ml_collections.ConfigDict) -> tuple[object, object, int]:
  """(train source, held-out source, number of classes) of config.dataset."""
  options = data_lib.options(config)
  if _source(config) == "archive":
    manifest = _prepare_archives(config, allow_build=jax.process_count() == 1)
    folder, _ = _folders(config)
    return (image_archives.ArraySource(folder, options.train_split, manifest),
            image_archives.ArraySource(folder, options.eval_split, manifest),
            manifest["num_classes"])
  data_dir = options.tfds_data_dir or None
  train = load_split(options.tfds_name, options.train_split, data_dir)
  return (train, load_split(options.tfds_name, options.eval_split, data_dir),
          _num_classes(train))


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Batches of config.dataset images as 256-way tokens, labels kept."""
  options = data_lib.options(config)
  train, held_out, num_classes = _splits(config)
  image_shape = tuple(to_example(train[0])["x"].shape)
  if len(image_shape) != 3 or image_shape[-1] != 3:
    raise ValueError(f"{config.dataset} has images of shape {image_shape}, expected [H, W, 3]")
  return data_lib.Dataset(
      train=pipeline.train_iterator(
          train, config.batch_size, config.seed, transform=to_example,
          random_transform=random_flip if options.random_flip else None),
      eval_batches=pipeline.eval_iterator_fn(held_out, config.batch_size,
                                             transform=to_example),
      vocab_size=256,
      example_shape=image_shape,
      modality="image",
      num_classes=num_classes,
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, object]:
  """Converts the official archives, or downloads and prepares both splits with tfds."""
  del progress
  options = data_lib.options(config)
  if _source(config) == "archive":
    manifest = _prepare_archives(config, allow_build=True)
    return {"folder": str(_folders(config)[0]),
            "examples": {split: shape[0] for split, shape in manifest["splits"].items()}}
  sizes = {split: len(load_split(options.tfds_name, split, options.tfds_data_dir or None,
                                 download=True))
           for split in (options.train_split, options.eval_split)}
  return {"tfds_name": options.tfds_name, "examples": sizes}


# (image shape, classes) of each source's own dataset, for md4.compile.
_SHAPES = {"cifar10": ((32, 32, 3), 10), "imagenet64": ((64, 64, 3), 1000)}


def shapes(config: ml_collections.ConfigDict) -> data_lib.Shapes:
  image_shape, num_classes = _SHAPES[config.dataset]
  return data_lib.Shapes(256, image_shape, num_classes)


CIFAR10 = data_lib.register(data_lib.Source(
    "cifar10", _options("cifar10", "test",
                        download=True),  # Download cifar-10-python.tar.gz when absent.
    create, prepare, shapes))
IMAGENET64 = data_lib.register(
    data_lib.Source("imagenet64", _options("imagenet_resized/64x64", "validation"), create,
                    prepare, shapes))
