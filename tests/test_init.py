"""The named initialisations (config.model.embed_init, kernel_init) draw their documented laws.

At width 128, 2 layers, MLP hidden 352 (the matched settings of
benchmarks/vs_reference.py), every kernel of the parameter tree has the
standard deviation its choice documents: md4's (token table 1, block inputs
0.02, block outputs 0.02 / sqrt(2 layers)) and the MD4 reference's (flax
nn.Embed's 1/sqrt(width); fan-in laws, the MLP's scaled by 2 / layers).
"""

import math

import jax
import numpy as np
import pytest

from md4 import defaults
from md4 import models

WIDTH, LAYERS, HIDDEN = 128, 2, 352

EXPECTED_STD = {
    "md4": {"embedding": 1.0, "qkv": 0.02, "mlp_in": 0.02,
            "attention_out": 0.02 / math.sqrt(2 * LAYERS),
            "mlp_out": 0.02 / math.sqrt(2 * LAYERS)},
    "reference": {"embedding": 1 / math.sqrt(WIDTH), "qkv": 1 / math.sqrt(WIDTH),
                  "attention_out": 1 / math.sqrt(WIDTH),
                  "mlp_in": math.sqrt(2 / LAYERS / WIDTH),
                  "mlp_out": math.sqrt(2 / LAYERS / HIDDEN)},
}


def matched_params(embed_init: str, kernel_init: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Initial network parameters by path ("block0/qkv/kernel", ...)."""
  config = defaults.get_config()
  config.model.update(width=WIDTH, num_layers=LAYERS, num_heads=4, cond_dim=32,
                      mlp_ratio=8 / 3, mlp_multiple_of=32, embed_init=embed_init,
                      kernel_init=kernel_init)
  model = models.create(config, vocab_size=27, example_shape=(64,))
  params = jax.tree.map(lambda x: x.unbox(), model.init(jax.random.PRNGKey(seed)),
                        is_leaf=lambda x: hasattr(x, "unbox"))["network"]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}


def kind_of(path: str) -> str | None:
  """The kernel kind a parameter path holds, if it is one whose law a choice sets."""
  for kind in ("qkv", "attention_out", "mlp_in", "mlp_out"):
    if f"/{kind}/kernel" in path:
      return kind
  return "embedding" if path == "embed/embedding" else None


@pytest.mark.parametrize("choice", ["md4", "reference"])
def test_each_kernel_kind_draws_its_documented_standard_deviation(choice):
  params = matched_params(choice, choice)
  assert params["block0/mlp_out/kernel"].shape == (HIDDEN, WIDTH)
  seen = set()
  for path, value in params.items():
    kind = kind_of(path)
    if kind is None:
      continue
    seen.add(kind)
    expected = EXPECTED_STD[choice][kind]
    # At >= 28 x 128 draws the sample std is within 5% of the law's.
    assert value.std() == pytest.approx(expected, rel=0.05), (path, value.std(), expected)
    assert abs(value.mean()) < 0.1 * expected, path
    if choice == "reference" and kind != "embedding":  # Truncated at two standard deviations.
      assert np.abs(value).max() <= 2 * expected / 0.8796 + 1e-6, path
  assert seen == set(EXPECTED_STD[choice])


def test_the_two_choices_are_separate_factors():
  mixed = matched_params("reference", "md4")
  assert mixed["embed/embedding"].std() == pytest.approx(1 / math.sqrt(WIDTH), rel=0.05)
  assert mixed["block1/qkv/kernel"].std() == pytest.approx(0.02, rel=0.05)


def test_an_unknown_choice_is_named():
  with pytest.raises(ValueError, match="kernel_init"):
    matched_params("md4", "lecun")
  with pytest.raises(ValueError, match="embed_init"):
    matched_params("glorot", "md4")
