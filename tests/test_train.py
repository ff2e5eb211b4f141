"""train_and_evaluate: config checks, sharding equivalence, resume, NaN stop, quick start."""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from md4 import defaults
from md4 import models
from md4 import restored
from md4 import train
from md4.networks import kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A config that trains a very small model on the synthetic Markov source."""
  config = defaults.get_config()
  config.seq_len = 16
  config.batch_size = 8
  config.num_train_steps = 4
  config.model.width = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.synthetic.num_eval_examples = 16
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.sample_every_steps = 4
  config.sample_steps = 8
  config.update(overrides)
  return config


def run_python(code: str, devices: int = 1, timeout: int = 600) -> str:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_unknown_config_key_fails_naming_it():
  config = tiny_config()
  config.model.widht = 64
  with pytest.raises(ValueError, match="'model.widht'"):
    train.train_and_evaluate(config, "/nonexistent/never/created")


def test_wrong_config_type_fails_naming_it():
  config = ml_collections.ConfigDict(tiny_config().to_dict())
  config.unlock()
  del config["batch_size"]
  config.batch_size = "eight"
  with pytest.raises(TypeError, match="'batch_size'"):
    defaults.validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("keep_checkpoints", 0, "config.keep_checkpoints must be >= 1, got 0"),
    ("grad_accum_steps", 0, "config.grad_accum_steps must be >= 1, got 0"),
    ("model.width", 0, "config.model.width must be >= 1, got 0"),
    ("seq_len", -3, "config.seq_len must be >= 1, got -3"),
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate must be > 0, got -1.0"),
])
def test_a_value_that_would_fail_later_is_refused_up_front(tmp_path, key, value, message):
  config = tiny_config()
  group, _, name = key.rpartition(".")
  (config[group] if group else config)[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(config, tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_a_relative_workdir_is_made_absolute_and_trains(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2,
                                       sample_every_steps=2), "runs/a")
  assert sorted(path.name for path in (tmp_path / "runs" / "a" / "checkpoints").iterdir()) == ["2"]
  assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]


@pytest.mark.parametrize("workdir, message", [("", "--workdir is empty"),
                                              ("a_file", "is a file, not a directory")])
def test_an_empty_workdir_or_a_file_is_refused_writing_nothing(tmp_path, monkeypatch, workdir,
                                                                message):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "a_file").write_text("notes")
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(), workdir)
  assert [path.name for path in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  defaults.validate(module.get_config())


def test_unknown_attention_implementation_fails_naming_it():
  config = tiny_config()
  config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    defaults.validate(config)


def test_default_attention_is_xla_on_cpu_and_a_named_one_is_kept():
  assert kernels.attention_kernel("", jax.numpy.bfloat16, 64) == "xla"
  assert kernels.attention_kernel("cudnn", jax.numpy.bfloat16, 64) == "cudnn"


def test_wrong_config_flag_fails_before_compilation(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "md4.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.model.widht=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "widht" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


MESH_STEP = """
import json, jax, numpy as np
from md4 import trainer as trainer_lib
from md4.runtime import sharding
from tests.test_train import tiny_config
results = {}
for shape in [(1, 1), (8, 1), (2, 4)]:
  config = tiny_config(mesh_shape=shape, mesh_axes=("data", "fsdp"))
  dataset, trainer = trainer_lib.build(config, jax.devices()[:int(np.prod(shape))])
  state = trainer.init(jax.random.PRNGKey(0))
  batch = sharding.global_batch(next(dataset.train), trainer.batch_sharding)
  state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
  embed = state.params["network"]["embed"]["embedding"]
  results[str(shape)] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                         "embed_spec": str(embed.sharding.spec)}
print(json.dumps(results))
"""


def test_one_step_is_the_same_on_every_mesh():
  results = json.loads(run_python(MESH_STEP, devices=8))
  reference = results["(1, 1)"]
  for shape, result in results.items():
    np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-5, err_msg=shape)
    np.testing.assert_allclose(result["grad_norm"], reference["grad_norm"], rtol=1e-5,
                               err_msg=shape)
  # The fsdp axis really shards the parameters.
  assert "fsdp" in results["(2, 4)"]["embed_spec"]


def restore_params(workdir: pathlib.Path, step: int) -> dict:
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored.state["params"]


def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(tmp_path):
  config = tiny_config(num_train_steps=6, checkpoint_every_steps=3)
  train.train_and_evaluate(config, tmp_path / "whole")
  # Stop after step 3 by pretending a preemption arrives there.
  code = f"""
  import signal, os
  from md4 import train, trainer
  from tests.test_train import tiny_config
  config = tiny_config(num_train_steps=6, checkpoint_every_steps=3)
  original = trainer.Trainer.__init__
  def patched_init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    inner = self.train_step
    calls = []
    def train_step(*a):
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return inner(*a)
    self.train_step = train_step
  trainer.Trainer.__init__ = patched_init
  try:
    train.train_and_evaluate(config, {str(tmp_path / 'split')!r})
  except SystemExit as e:
    print("EXIT", e)
  """
  output = run_python(code)
  assert "Preempted at step 3" in output
  output = run_python(f"""
  from md4 import train
  from tests.test_train import tiny_config
  train.train_and_evaluate(tiny_config(num_train_steps=6, checkpoint_every_steps=3),
                           {str(tmp_path / 'split')!r})
  """)
  whole = restore_params(tmp_path / "whole", 6)
  split = restore_params(tmp_path / "split", 6)
  jax.tree.map(np.testing.assert_array_equal, whole, split)
  lines = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").open()]
  assert [line["step"] for line in lines if "loss" in line] == [2, 4, 6]


def test_nan_stops_with_the_step_and_metric(tmp_path, monkeypatch):
  original_loss = models.MD4.loss

  def poisoned_loss(self, params, batch, rng, train_mode):
    output = original_loss(self, params, batch, rng, train_mode)
    return output.replace(objective=output.objective * np.nan)

  monkeypatch.setattr(models.MD4, "loss", poisoned_loss)
  with pytest.raises(FloatingPointError, match="step 1: loss is nan"):
    train.train_and_evaluate(tiny_config(), tmp_path)
  assert not (tmp_path / "checkpoints" / "2").exists()


def test_outputs_land_in_the_workdir(tmp_path):
  eval_metrics = train.train_and_evaluate(tiny_config(), tmp_path)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  train_lines = [line for line in lines if "loss" in line]
  assert [line["step"] for line in train_lines] == [2, 4]
  for key in ("bits_per_token", "param_norm", "steps_per_sec", "grad_norm"):
    assert key in train_lines[0]
  assert eval_metrics["data_entropy_bits_per_token"] > 0
  assert any("eval_bits_per_token" in line for line in lines)
  samples = (tmp_path / "samples" / "step_4.txt").read_text().splitlines()
  assert len(samples) == 4 and all(len(s) == 16 for s in samples)
  assert list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))
  assert list((tmp_path / "tensorboard" / "eval").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "config.json").read_text())["seq_len"] == 16
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_quickstart_bound_is_above_the_entropy_and_close_to_it(tmp_path):
  """The whole quick start through the real command: a bound, near the entropy.

  On the README's machine it ends 0.135 bits above; its seeds range from 0.13
  to 0.47 (configs/quickstart.py), and another CPU's rounding acts like
  another seed, hence the margin.
  """
  result = subprocess.run(
      [sys.executable, "-m", "md4.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "held-out NELBO" in result.stdout and "source entropy" in result.stdout
  final = [record for record in map(json.loads, (tmp_path / "metrics.jsonl").open())
           if "eval_bits_per_token" in record][-1]
  bound, entropy = final["eval_bits_per_token"], final["data_entropy_bits_per_token"]
  assert entropy <= bound < entropy + 0.6, (bound, entropy)
  assert (tmp_path / "samples" / "step_1000.txt").exists()
  assert (tmp_path / "checkpoints" / "1000").is_dir()

  # Mixed precision: bf16 compute on the same sequences, times and masks gives the
  # same bound as f32, within the paired noise (and a hundredth of a bit).
  bits = {}
  for dtype in ("float32", "bfloat16"):
    checkpoint = restored.restore(tmp_path, dtype=dtype)
    nats = restored.nelbo_per_sequence(
        checkpoint, restored.split_batches(checkpoint, "eval", 8), num_t=4, seed=0)
    bits[dtype] = nats / (checkpoint.model.num_tokens * math.log(2))
  difference = bits["bfloat16"] - bits["float32"]
  paired_error = difference.std(ddof=1) / math.sqrt(len(difference))
  assert abs(difference.mean()) < max(4 * paired_error, 1e-3), (difference.mean(), paired_error)
  assert abs(difference.mean()) < 0.01
