"""Checkpoints keep loading: every backbone's parameter names and shapes, as the configs build them.

`parameter_trees.json` holds, for each case, the sorted "path shape" lines of
`model.init`'s parameters (`jax.eval_shape`: nothing is allocated). A
refactoring of the networks or of how the configs reach them that renames or
reshapes a parameter fails here, not on a user's restore.
"""

import importlib
import json
import pathlib

import flax.linen as nn
import jax
import pytest

from md4 import defaults
from md4 import models

TREES = pathlib.Path(__file__).parent / "parameter_trees.json"

# name: (experiment file, overrides shrinking its depth, vocab_size, example shape, classes).
CASES = {
    "quickstart": ("quickstart", {}, 27, (16,), 0),
    "text8": ("text8", {"model.num_layers": 2}, 27, (16,), 0),
    "text8_scanned": ("text8", {"model.num_layers": 2, "model.scan_layers": True}, 27,
                      (16,), 0),
    "genmd4_text8": ("genmd4_text8", {"model.num_layers": 2}, 27, (16,), 0),
    "prime_text8": ("prime_text8", {"model.num_layers": 2}, 27, (16,), 0),
    "cifar10": ("cifar10", {"model.unet_num_res_blocks": 2}, 256, (32, 32, 3), 0),
    "cifar10_conditional": ("cifar10_conditional", {"model.unet_num_res_blocks": 1}, 256,
                            (32, 32, 3), 10),
    "imagenet64": ("imagenet64", {"model.unet_num_res_blocks": 1, "model.num_layers": 2}, 256,
                   (64, 64, 3), 0),
    "dit": ("imagenet64", {"model.backbone": "dit", "model.num_layers": 2}, 256,
            (64, 64, 3), 0),
}


def parameter_tree(case: str) -> list[str]:
  """The sorted "path shape" lines of the case's parameters."""
  name, overrides, vocab_size, example_shape, num_classes = CASES[case]
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in overrides.items():
    group, _, field = key.rpartition(".")
    config[group][field] = value
  model = models.create(defaults.validate(config), vocab_size, example_shape, num_classes)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  return sorted(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}"
                for path, leaf in jax.tree_util.tree_leaves_with_path(params))


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_names_and_shapes_are_those_checkpoints_hold(case):
  assert parameter_tree(case) == json.loads(TREES.read_text())[case]


def test_an_unknown_backbone_is_named_with_the_valid_ones():
  config = defaults.get_config()
  config.model.backbone = "resnet"
  with pytest.raises(ValueError, match=r"backbone='resnet'; valid: transformer, unet, uvit, dit"):
    models.build_network(config, 27, 0)
