"""The paper configs build their reference networks: parameter counts against the references'.

The MD4 and GenMD4 counts are those of google-deepmind/md4's own `MD4` /
`GenMD4` models instantiated with its configs (the text8 and OpenWebText
numbers are the ones issue 21 gives; the image ones were counted by running
the reference's networks under `jax.eval_shape`); the MDM-Prime ones are
those of chen-hao-chao/mdm-prime's `PerceiverDIT` with its `small.yaml`,
counted from its torch modules' shapes. Counts leave out the zero output
columns that pad the transformer's logits to a multiple of 128 (they receive
no gradient). Shapes only: `jax.eval_shape`, nothing is allocated or compiled.
"""

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import pytest

from md4 import defaults
from md4 import models
from md4.networks import transformer

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "configs"
# md4's own experiments, with no paper network to match.
NOT_PAPER_CONFIGS = {"__init__", "quickstart", "quickstart_text", "chars"}

GPT2_VOCAB_SIZE = 50257
TEXT8, OWT = ((27, (256,)), (GPT2_VOCAB_SIZE, (1024,)))
CIFAR10, IMAGENET64 = ((256, (32, 32, 3)), (256, (64, 64, 3)))

# config module: (vocab size, example shape, number of classes, the reference's parameter count).
MD4_REFERENCE = {
    "text8": (*TEXT8, 0, 88_734_272),
    "owt": (*OWT, 0, 165_857_344),
    "cifar10": (*CIFAR10, 0, 28_427_520),
    "imagenet64": (*IMAGENET64, 0, 204_595_712),
}
# GenMD4: MD4's network and one schedule exponent per token value.
GENMD4 = {"genmd4_text8": "text8", "genmd4_owt": "owt"}
# MDM-Prime's backbone: within 0.5%, for the differences owt_prime.py lists.
PRIME_REFERENCE = {
    "prime_text8": (*TEXT8, 0, 92_404_123),
    "owt_prime": (*OWT, 0, 131_115_089),
}
# md4's class-conditional variants: the unconditional network and a label table.
CONDITIONAL = {"cifar10_conditional": ("cifar10", 10), "imagenet64_conditional": ("imagenet64", 1000)}


def get_config(name: str):
  return defaults.validate(importlib.import_module(f"configs.{name}").get_config())


def parameter_count(config, vocab_size: int, example_shape: tuple[int, ...],
                    num_classes: int = 0) -> int:
  """Parameters of the model config builds, less the transformer's padded output columns."""
  model = models.create(config, vocab_size, example_shape, num_classes)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  count = sum(x.size for x in jax.tree.leaves(params))
  if config.model.backbone == "transformer":
    width, padded = params["network"]["output"]["kernel"].shape
    assert padded == -(-vocab_size // transformer.OUTPUT_ALIGNMENT) * transformer.OUTPUT_ALIGNMENT
    count -= width * (padded - vocab_size)
  return count


def assert_documented(name: str, *counts: int) -> None:
  """The config's docstring states each count as the test finds it."""
  doc = importlib.import_module(f"configs.{name}").__doc__
  for count in counts:
    assert f"{count:,}" in doc, (name, f"{count:,}")


@pytest.mark.parametrize("name", sorted(MD4_REFERENCE))
def test_md4_configs_have_the_reference_count(name):
  vocab_size, example_shape, num_classes, reference = MD4_REFERENCE[name]
  count = parameter_count(get_config(name), vocab_size, example_shape, num_classes)
  assert count == reference
  assert_documented(name, reference)


def test_imagenet64_best_likelihood_variant_has_the_reference_count():
  # The reference's sweep: "use 24 for best likelihood in the paper", and 12 DiT blocks.
  config = get_config("imagenet64")
  config.model.unet_num_res_blocks = 24
  config.model.num_layers = 12
  assert parameter_count(config, *IMAGENET64) == 198_279_680
  assert_documented("imagenet64", 198_279_680)


@pytest.mark.parametrize("name", sorted(GENMD4))
def test_genmd4_adds_only_its_schedule(name):
  vocab_size, example_shape, _, md4_reference = MD4_REFERENCE[GENMD4[name]]
  config = get_config(name)
  assert config.model_type == "genmd4"
  count = parameter_count(config, vocab_size, example_shape)
  assert count == md4_reference + vocab_size
  assert_documented(name, count)


@pytest.mark.parametrize("name", sorted(PRIME_REFERENCE))
def test_prime_configs_are_within_half_a_percent_of_the_reference(name):
  vocab_size, example_shape, num_classes, reference = PRIME_REFERENCE[name]
  config = get_config(name)
  assert config.model_type == "prime" and config.model.time_conditioning == "none"
  count = parameter_count(config, vocab_size, example_shape, num_classes)
  assert abs(count - reference) <= 0.005 * reference, (count, reference)
  assert_documented(name, count, reference)


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_conditional_variants_add_a_label_table(name):
  unconditional, num_classes = CONDITIONAL[name]
  vocab_size, example_shape, _, reference = MD4_REFERENCE[unconditional]
  config = get_config(name)
  label_table = (num_classes + 1) * config.model.cond_dim
  assert parameter_count(config, vocab_size, example_shape, num_classes) == reference + label_table


def test_every_paper_config_is_counted():
  configs = {path.stem for path in CONFIG_DIR.glob("*.py")}
  counted = {*MD4_REFERENCE, *GENMD4, *PRIME_REFERENCE, *CONDITIONAL}
  assert configs - NOT_PAPER_CONFIGS == counted, (
      "count each new paper config here against its reference, or list it in NOT_PAPER_CONFIGS")


def test_every_config_loads_from_a_benchmark_script_and_outside_a_checkout(tmp_path):
  """`python benchmarks/x.py --config=configs/NAME.py` puts benchmarks/, not the root, on sys.path."""
  load_each = textwrap.dedent("""
      import sys
      from absl import flags
      from ml_collections import config_flags
      from md4 import defaults
      for path in sys.argv[1:]:
        flag_values = flags.FlagValues()
        config = config_flags.DEFINE_config_file("config", flag_values=flag_values)
        flag_values(["benchmark", f"--config={path}"])
        defaults.validate(config.value)
        print(path)
  """)
  paths = sorted(str(path) for path in CONFIG_DIR.glob("*.py") if path.stem != "__init__")
  # This checkout's md4 importable, its root (and so a top-level `configs`) not.
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "md4").symlink_to(CONFIG_DIR.parent / "md4")
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
  for cwd in (CONFIG_DIR.parent / "benchmarks", tmp_path):
    result = subprocess.run([sys.executable, "-c", load_each, *paths], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == paths
