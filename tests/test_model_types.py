"""Short training runs of GenMD4 and MDM-Prime on the known-entropy Markov source."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from md4 import train
from tests.test_train import tiny_config


def run(tmp_path, **overrides) -> dict[str, float]:
  config = tiny_config(num_train_steps=30, log_every_steps=10, eval_every_steps=30,
                       checkpoint_every_steps=30, sample_every_steps=30, **overrides)
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 5
  config.synthetic.num_eval_examples = 64
  return config, train.train_and_evaluate(config, tmp_path)


def assert_valid_bound(eval_metrics: dict[str, float]) -> None:
  """The held-out bound may not fall below the source's entropy (beyond its error)."""
  bound, entropy = eval_metrics["eval_bits_per_token"], eval_metrics["data_entropy_bits_per_token"]
  assert bound >= entropy - 4 * eval_metrics["eval_bits_per_token_stderr"], (bound, entropy)
  assert np.isfinite(bound)


def test_genmd4_trains_a_valid_bound_and_moves_its_exponents(tmp_path):
  config, eval_metrics = run(tmp_path, model_type="genmd4")
  assert_valid_bound(eval_metrics)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state",))
  phi = manager.restore(30, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state["params"]["schedule"]["phi"]
  exponents = np.asarray(jax.nn.softplus(phi))
  assert exponents.shape == (27,)
  assert np.abs(exponents - config.genmd4.init_power).max() > 1e-3


@pytest.mark.parametrize("length, binary, objective", [(2, False, "nelbo"), (3, False, "joint"),
                                                       (1, True, "nelbo")])
def test_prime_trains_a_valid_bound(tmp_path, length, binary, objective):
  _, eval_metrics = run(tmp_path, model_type="prime",
                        prime=dict(length=length, binary=binary, shuffle_seed=-1,
                                   objective=objective))
  assert_valid_bound(eval_metrics)
  assert (tmp_path / "samples" / "step_30.txt").exists()
