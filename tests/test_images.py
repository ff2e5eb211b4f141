"""Images: shrunk CIFAR-10 / ImageNet-64 configs prepare and train from small official-format
archives, offline and without TensorFlow; guidance; PNG files."""

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from md4 import data
from md4 import models
from md4 import sampler
from md4 import train
from md4 import visualize
from tests import test_image_archives

REPO = pathlib.Path(__file__).resolve().parents[1]
no_tensorflow = test_image_archives.no_tensorflow


def load_png(path: pathlib.Path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink(config):
  """The config's model and schedule of work cut down to a few channels and steps."""
  config.model.update(unet_channels=8, unet_num_res_blocks=1, unet_norm_groups=4,
                      unet_attention_resolutions=(), width=16, num_layers=1, num_heads=2,
                      patch_size=8, dtype="float32")
  config.update(batch_size=4, num_train_steps=2, log_every_steps=1, eval_every_steps=2,
                num_eval_steps=1, checkpoint_every_steps=2, sample_every_steps=2,
                num_samples=4, sample_steps=4, num_montage_frames=3)
  return config


@pytest.mark.parametrize("name", ["cifar10", "cifar10_conditional", "imagenet64_conditional"])
def test_two_training_steps_from_official_format_archives(name, tmp_path, monkeypatch,
                                                          no_tensorflow):
  config = shrink(load_config(name))
  config.data_dir = str(tmp_path / "data")
  if name.startswith("cifar10"):
    test_image_archives.prepared_cifar10(monkeypatch, tmp_path / "data")
  else:
    test_image_archives.prepared_imagenet64(monkeypatch, tmp_path / "data")
  tmp_path = tmp_path / "run"
  eval_metrics = train.train_and_evaluate(config, tmp_path)
  assert np.isfinite(eval_metrics["eval_bits_per_token"])
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert [line["step"] for line in lines if "loss" in line] == [1, 2]
  size = 32 if name.startswith("cifar10") else 64
  sample_grid = load_png(tmp_path / "samples/step_2.png")
  assert sample_grid.shape == (2 * (size + 2) + 2, 2 * (size + 2) + 2, 3)
  strip = load_png(tmp_path / "samples/step_2_reverse_process.png")
  assert strip.shape == (size + 4, 3 * (size + 2) + 2, 3)
  first_frame = strip[2:2 + size, 2:2 + size]
  assert (first_frame == visualize.MASK_COLOR).all()  # The reverse process starts masked.


def test_guidance_scale_zero_is_the_unconditional_sampler():
  config = shrink(load_config("cifar10_conditional"))
  model = models.create(config, 256, (8, 8, 3), num_classes=10)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
  # Perturbed away from the zero-initialised output layers, so that labels matter.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])
  rng = jax.random.PRNGKey(1)

  def guided(scale):
    return jax.jit(lambda p: model.sample(p, rng, 4, steps=config.sample_steps,
                                          grid=config.sample_grid,
                                          guidance_scale=scale).tokens)(params)

  unconditional = jax.jit(lambda p: sampler.ancestral(
      model.predict_fn(p, label=None), rng, shape=(4, 8, 8, 3), vocab_size=256,
      schedule=model.schedule, steps=config.sample_steps, grid=config.sample_grid))(params)
  np.testing.assert_array_equal(guided(0.0), unconditional)
  assert (np.asarray(guided(3.0)) != np.asarray(unconditional)).any()


def test_png_reads_back_identical(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  visualize.save_png(tmp_path / "a.png", image)
  np.testing.assert_array_equal(load_png(tmp_path / "a.png"), image)


def test_masked_pixels_are_drawn_grey():
  tokens = np.array([[[0, 256, 255]]])
  np.testing.assert_array_equal(visualize.to_pixels(tokens), [[[0, 128, 255]]])


def test_class_conditional_config_uses_the_labels():
  config = shrink(load_config("cifar10_conditional"))
  config.cifar10.source = "tfds"
  with tfds.testing.mock_data(num_examples=16):
    dataset = data.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape, dataset.num_classes)
  assert model.num_classes == 10
  config.class_conditional = False
  assert models.create(config, 256, (32, 32, 3), 10).num_classes == 0
