"""Image pipelines through tfds (source="tfds"), on tfds.testing.mock_data (no files, no TensorFlow)."""

import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from md4 import data as data_lib
from tests import helpers


def _config(dataset="cifar10", batch_size=8, **options) -> ml_collections.ConfigDict:
  return helpers.data_config(dataset, batch_size=batch_size, source="tfds", **options)


def _source_images(name: str, split: str) -> dict[bytes, int]:
  """Image bytes -> index, for every example the mock serves."""
  source = tfds.data_source(name, split=split, download=False)
  return {np.asarray(source[i]["image"]).tobytes(): i for i in range(len(source))}


@pytest.mark.parametrize("dataset, shape, num_classes, tfds_name, eval_split", [
    ("cifar10", (32, 32, 3), 10, "cifar10", "test"),
    ("imagenet64", (64, 64, 3), 1000, "imagenet_resized/64x64", "validation"),
])
def test_batches_hold_pixel_tokens_and_labels(dataset, shape, num_classes, tfds_name,
                                              eval_split):
  with tfds.testing.mock_data(num_examples=24):
    created = data_lib.create(_config(dataset))
    assert (created.vocab_size, created.example_shape, created.num_classes) == (
        256, shape, num_classes)
    assert created.decode is None
    train_images = _source_images(tfds_name, "train")
    source = tfds.data_source(tfds_name, split="train", download=False)
    seen = set()
    for _ in range(3):  # One epoch of 24 examples.
      batch = next(created.train)
      assert batch["x"].shape == (8, *shape) and batch["x"].dtype == np.int32
      assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
      for image, label in zip(batch["x"], batch["label"]):
        index = train_images[image.astype(np.uint8).tobytes()]
        assert label == source[index]["label"]
        seen.add(index)
    assert seen == set(range(24))
    eval_batches = list(created.eval_batches())
    assert len(eval_batches) == 3
    eval_images = _source_images(tfds_name, eval_split)
    assert all(image.astype(np.uint8).tobytes() in eval_images
               for batch in eval_batches for image in batch["x"])
    assert 0 <= min(b["label"].min() for b in eval_batches)
    assert max(b["label"].max() for b in eval_batches) < num_classes


def test_random_flips_mirror_about_half_the_images_deterministically():
  with tfds.testing.mock_data(num_examples=64):
    train_images = _source_images("cifar10", "train")
    batches = [next(data_lib.create(_config(batch_size=64, random_flip=True)).train)
               for _ in range(2)]
    np.testing.assert_array_equal(batches[0]["x"], batches[1]["x"])
    flipped = 0
    for image in batches[0]["x"].astype(np.uint8):
      if image.tobytes() not in train_images:
        assert image[:, ::-1].tobytes() in train_images
        flipped += 1
    # Binomial(64, 1/2): P(outside [16, 48]) < 1e-4.
    assert 16 <= flipped <= 48
    unflipped = next(data_lib.create(_config(batch_size=64)).train)["x"].astype(np.uint8)
    assert all(image.tobytes() in train_images for image in unflipped)


def test_mock_data_source_needs_no_tensorflow():
  with tfds.testing.mock_data(num_examples=4):
    next(data_lib.create(_config(batch_size=4)).train)
  assert "tensorflow" not in sys.modules


def test_missing_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="md4.data.prepare"):
    data_lib.create(_config(tfds_data_dir=str(tmp_path)))


def test_options():
  assert _config("imagenet64").imagenet64.tfds_name == "imagenet_resized/64x64"
  assert _config("imagenet64").imagenet64.eval_split == "validation"
  assert _config().cifar10.eval_split == "test"
  with pytest.raises(ValueError, match="unknown config key 'cifar10.flip'"):
    _config(flip=True)
