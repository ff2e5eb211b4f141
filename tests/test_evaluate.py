"""md4.evaluate: stratified NELBO from a checkpoint, zero-shot text, samples, bad input."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import diffusion
from md4 import evaluate
from md4 import models
from md4 import train
from md4.data import alphabet
from md4.data import tokens
from tests.test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 32
BATCH_SIZE = 16
NUM_EVAL_EXAMPLES = 1024
TRAIN_STEPS = 16


def _config() -> ml_collections.ConfigDict:
  # poly3: 1 - alpha_t = t^3 near 0. With linear or cosine (1 - alpha_t ~ t) the
  # per-sequence NELBO has a right tail P(X > x) ~ x^-2 (md4.evaluate's docstring) and
  # sample standard errors understate the spread (measured: a training eval 3.6 of its
  # own standard errors below the 128-time value). poly3's tail, ~ x^-4, is light enough
  # for the standard-error checks below to mean what they say.
  config = tiny_config(
      seq_len=SEQ_LEN, batch_size=BATCH_SIZE, num_train_steps=TRAIN_STEPS,
      log_every_steps=TRAIN_STEPS, eval_every_steps=TRAIN_STEPS,
      checkpoint_every_steps=TRAIN_STEPS, sample_every_steps=TRAIN_STEPS,
      noise_schedule="poly3", ema_rate=0.9, eval_num_t=1)
  config.data.num_eval_examples = NUM_EVAL_EXAMPLES
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 4
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(_config(), str(path))
  return path


@pytest.fixture(scope="module")
def checkpoint(workdir) -> evaluate.Checkpoint:
  return evaluate.restore(workdir)


def _training_eval(workdir: pathlib.Path, step: int) -> dict:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  (line,) = [line for line in lines if line["step"] == step and "eval_bits_per_token" in line]
  return line


def test_nelbo_matches_the_training_eval_within_standard_errors(workdir):
  results = evaluate.run(workdir, num_t=4)
  section = results["nelbo"]["eval"]
  reference = _training_eval(workdir, TRAIN_STEPS)
  assert results["step"] == TRAIN_STEPS
  assert section["num_sequences"] == reference["eval_examples"] == NUM_EVAL_EXAMPLES
  combined = math.hypot(section["bits_per_token_stderr"],
                        reference["eval_bits_per_token_stderr"])
  # Both estimate the same mean over the same sequences, with independent times and masks.
  # 4 combined standard errors: a false alarm rate of 6e-5 under the normal approximation.
  assert abs(section["bits_per_token"] - reference["eval_bits_per_token"]) < 4 * combined
  # Four stratified times per sequence: a smaller standard error than training's one
  # (this training run evaluates with eval_num_t=1).
  assert section["bits_per_token_stderr"] < reference["eval_bits_per_token_stderr"]
  # A bound on a source of known entropy never falls below it (4 standard errors of slack).
  entropy = section["data_entropy_bits_per_token"]
  assert entropy == pytest.approx(reference["data_entropy_bits_per_token"])
  assert section["bits_per_token"] + 4 * section["bits_per_token_stderr"] > entropy
  written = json.loads((workdir / "eval" / f"results_step_{TRAIN_STEPS}.json").read_text())
  assert written["nelbo"]["eval"] == section
  assert "perplexity" not in section and "bits_per_dim" not in section


def test_standard_error_shrinks_as_one_over_sqrt_of_the_sequences(checkpoint):
  num_batches = NUM_EVAL_EXAMPLES // BATCH_SIZE
  small = evaluate.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(),
                                      num_t=2, num_batches=num_batches // 4, seed=1)
  large = evaluate.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(),
                                      num_t=2, num_batches=num_batches, seed=1)
  # Same seed and batches: the first quarter is the same estimates.
  np.testing.assert_array_equal(small, large[:len(small)])
  se_small = evaluate.summarise(small, SEQ_LEN)["bits_per_token_stderr"]
  se_large = evaluate.summarise(large, SEQ_LEN)["bits_per_token_stderr"]
  # se_N / se_4N = 2 s_N / s_4N. For sample standard deviations of n draws with kurtosis k,
  # var(log s) ~ (k - 1) / (4 n); s_N is part of s_4N, so var(log s_N - log s_4N) ~
  # (k - 1) / 4 * (1/N - 1/(4N)). Allow 4 of those standard deviations.
  n = len(small)
  centred = large - large.mean()
  kurtosis = np.mean(centred**4) / np.mean(centred**2)**2
  tolerance = 4 * math.sqrt((kurtosis - 1) / 4 * (1 / n - 1 / (4 * n)))
  assert tolerance < 0.35, f"kurtosis {kurtosis:.1f} makes the check toothless"
  assert abs(math.log(se_small / se_large / 2)) < tolerance, (se_small, se_large, tolerance)


class _RowRecorder:
  """A model whose per-row "NELBO" is the row's sequence id and its time t."""

  def __init__(self):
    self.rows = None

  def loss(self, params, batch, rng, train_mode):
    del params, train_mode
    self.rows = batch["x"][:, 0]
    return 0.0, {"nelbo": batch["x"][:, 0].astype(jnp.float32)}


def test_tiled_batch_gives_each_sequence_one_time_per_stratum():
  num_t, batch_size = 4, 5
  batch = {"x": jnp.arange(batch_size)[:, None] * jnp.ones((1, 3), jnp.int32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  model = _RowRecorder()
  per_sequence = train.eval_step(model, sharding, num_t, None, batch, jax.random.PRNGKey(0))
  # Copy-major tiling (row k B + j is sequence j), averaged back per sequence.
  np.testing.assert_array_equal(model.rows, np.tile(np.arange(batch_size), num_t))
  np.testing.assert_array_equal(per_sequence, np.arange(batch_size))
  for seed in range(5):
    t = diffusion.sample_times(jax.random.PRNGKey(seed), num_t * batch_size, antithetic=True)
    per_sequence = np.sort(np.asarray(t).reshape(num_t, batch_size), axis=0)  # [K, B]
    # Consecutive times of a sequence are 1/K apart (cyclically): one per stratum.
    gaps = np.diff(np.concatenate([per_sequence, per_sequence[:1] + 1.0]), axis=0)
    np.testing.assert_allclose(gaps, 1.0 / num_t, atol=1e-6)


def test_summarise_units_and_perplexity():
  nats = np.array([30.0, 34.0, 38.0, 42.0])
  text = evaluate.summarise(nats, 8, word_pieces=True)
  bits = nats / (8 * math.log(2))
  assert text["bits_per_token"] == pytest.approx(bits.mean())
  assert text["bits_per_token_stderr"] == pytest.approx(bits.std(ddof=1) / 2)
  assert text["perplexity"] == pytest.approx(math.exp(36.0 / 8))
  images = evaluate.summarise(nats, 8, unit="dim")
  assert images["bits_per_dim"] == pytest.approx(bits.mean()) and "perplexity" not in images
  with pytest.raises(ValueError, match="unit"):
    evaluate.summarise(nats, 8, unit="pixel")


def test_sample_with_an_infill_template_keeps_the_given_text(workdir, tmp_path):
  template = "the ____ sat on the ___"
  results = evaluate.run(workdir, nelbo=False, sample=True, num_samples=3, steps=6,
                              infill=template, output_dir=str(tmp_path))
  files = results["samples"]["files"]
  assert len(files) == 3
  for file in files:
    text = pathlib.Path(file).read_text().rstrip("\n")
    assert len(text) == SEQ_LEN and set(text) <= set(alphabet.ALPHABET)
    kept = [(i, c) for i, c in enumerate(template) if c != "_"]
    assert [text[i] for i, _ in kept] == [c for _, c in kept], text
  ids = np.load(tmp_path / f"samples_step_{TRAIN_STEPS}" / "ids.npy")
  assert ids.shape == (3, SEQ_LEN)
  assert alphabet.decode(ids[0]) == pathlib.Path(files[0]).read_text().rstrip("\n")


def test_cli_on_eight_devices_samples_with_a_prefix_and_matches_one_device(
    workdir, checkpoint, tmp_path):
  prefix = "some text"
  result = subprocess.run(
      [sys.executable, "-m", "md4.evaluate", f"--workdir={workdir}", "--num_eval_batches=2",
       "--num_t=4", "--sample", "--num_samples=8", "--steps=6", "--top_p=0.9",
       f"--prefix={prefix}", f"--output_dir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 samples in" in result.stdout and "NELBO on eval" in result.stdout
  folder = tmp_path / f"samples_step_{TRAIN_STEPS}"
  texts = [(folder / f"sample_{i}.txt").read_text().rstrip("\n") for i in range(8)]
  assert all(len(text) == SEQ_LEN and text.startswith(prefix) for text in texts), texts
  written = json.loads((tmp_path / f"results_step_{TRAIN_STEPS}.json").read_text())
  assert written["samples"]["prefix"] == prefix and written["samples"]["top_p"] == 0.9
  # The batch split over 8 devices (2 rows each, tiled to 8) gives the one-device numbers.
  one_device = evaluate.summarise(
      evaluate.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(), num_t=4,
                                  num_batches=2, seed=0), SEQ_LEN)
  eight_devices = written["nelbo"]["eval"]
  assert eight_devices["num_sequences"] == one_device["num_sequences"] == 2 * BATCH_SIZE
  for key in ("bits_per_token", "bits_per_token_stderr"):
    assert eight_devices[key] == pytest.approx(one_device[key], rel=1e-5)


def test_zero_shot_on_a_text_file(workdir, tmp_path):
  path = tmp_path / "other.txt"
  path.write_text("The Cat sat on the mat, 42 times!\nA dog ran far away.\n" * 60)
  results = evaluate.run(workdir, text_file=str(path), num_t=2,
                              output_dir=str(tmp_path / "out"))
  (name,) = results["nelbo"]
  assert name == f"text_file:{path}"
  section = results["nelbo"][name]
  num_chars = len(" ".join(["the cat sat on the mat four two times a dog ran far away"] * 60))
  assert section["num_sequences"] == (num_chars // SEQ_LEN) // BATCH_SIZE * BATCH_SIZE
  assert np.isfinite(section["bits_per_token"]) and section["bits_per_token"] >= 0
  with pytest.raises(ValueError, match="text_file='/no/such/file.txt'"):
    evaluate.run(workdir, text_file="/no/such/file.txt")


def _corpus(path: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  words = "the cat dog sat on mat and ran far away from home when rain fell".split()
  path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(300)) + "\n")
  return path


def _tokens_config(corpus: pathlib.Path, data_dir: pathlib.Path,
                   **data) -> ml_collections.ConfigDict:
  config = tiny_config(dataset="tokens", data_dir=str(data_dir))
  config.data = ml_collections.ConfigDict({**tokens.DEFAULTS, "path": str(corpus),
                                           "vocab_size": 40, **data})
  return config


def test_token_corpus_needs_the_training_tokenizer(tmp_path):
  corpus = _corpus(tmp_path / "corpus.txt")
  trained = _tokens_config(corpus, tmp_path / "trained")
  tokens.load_or_build(trained.data, tmp_path / "trained")
  other = tokens.load_or_build(_tokens_config(corpus, tmp_path / "x", vocab_size=48).data,
                               tmp_path / "other")
  assert other.vocab_size == 48
  with pytest.raises(ValueError, match="different tokenizer .* data.tokenizer="):
    evaluate.check_token_corpus(tmp_path / "other", trained)
  tokens.load_or_build(_tokens_config(corpus, tmp_path / "x",
                                      tokenizer=str(tmp_path / "trained" / "tokenizer.model")
                                      ).data, tmp_path / "same")
  manifest = evaluate.check_token_corpus(tmp_path / "same", trained)
  assert manifest["vocab_size"] == 40
  batches = list(evaluate.token_corpus_batches(tmp_path / "same", trained, 4))
  assert len(batches) == manifest["num_tokens"] // 16 // 4
  assert all(batch["x"].shape == (4, 16) for batch in batches)
  # Through the command's function: the check comes before any checkpoint is read.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(trained.to_json_best_effort())
  with pytest.raises(ValueError, match="token_corpus=.*other' was tokenised with a different"):
    evaluate.run(tmp_path / "run", token_corpus=str(tmp_path / "other"))
  with pytest.raises(ValueError, match="not a corpus prepared by md4.data.tokens"):
    evaluate.check_token_corpus(tmp_path, trained)
  with pytest.raises(ValueError, match="dataset 'tokens'"):
    evaluate.check_token_corpus(tmp_path / "same", tiny_config())


def test_missing_workdir_config_or_checkpoint_fails_naming_the_path(workdir, tmp_path):
  with pytest.raises(ValueError, match="/no/such/workdir"):
    evaluate.run("/no/such/workdir")
  with pytest.raises(ValueError, match=f"{tmp_path}/config.json not found"):
    evaluate.run(tmp_path)
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match=f"{tmp_path}/checkpoints does not exist"):
    evaluate.run(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path}/checkpoints holds no finished checkpoint"):
    evaluate.run(tmp_path)
  with pytest.raises(ValueError, match=rf"step=7: .* available steps: \[{TRAIN_STEPS}\]"):
    evaluate.run(workdir, step=7)
  with pytest.raises(ValueError, match="split='test'"):
    evaluate.run(workdir, split="test")


def test_prefix_on_a_sampler_without_it_is_a_clear_error(checkpoint):
  config = tiny_config(model_type="genmd4")
  dataset = data_lib.create(config)
  model = models.create(config, dataset.vocab_size, dataset.example_shape)
  trainer = train.build_trainer(config, model, checkpoint.trainer.mesh)
  # The checks come before any parameter is read.
  genmd4 = evaluate.Checkpoint(checkpoint.workdir, 0, config, dataset, model, trainer,
                               params=None)
  with pytest.raises(ValueError, match="prefix: the genmd4 sampler .* has no prefix"):
    evaluate.generate(genmd4, jax.random.PRNGKey(0), num_samples=2, prefix="the")
  with pytest.raises(ValueError, match="top_p"):
    evaluate.generate(genmd4, jax.random.PRNGKey(0), num_samples=2, top_p=0.5)
  with pytest.raises(ValueError, match="prefix: character b'T'"):
    evaluate.generate(checkpoint, jax.random.PRNGKey(0), num_samples=2, prefix="The")
  with pytest.raises(ValueError, match="infill template makes 40 positions"):
    evaluate.generate(checkpoint, jax.random.PRNGKey(0), num_samples=2, infill="_" * 40)
