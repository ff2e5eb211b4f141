"""md4.evaluate: stratified NELBO from a checkpoint, zero-shot text, samples, bad input."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import diffusion
from md4 import evaluate
from md4 import likelihood
from md4 import models
from md4 import restored
from md4 import train
from md4.data import alphabet
from md4.data import tokens
from tests.test_train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 32
BATCH_SIZE = 16
NUM_EVAL_EXAMPLES = 1024
TRAIN_STEPS = 16


def run(workdir, **options) -> dict:
  """What `python -m md4.evaluate --workdir=... --option=value ...` runs."""
  return evaluate.run(evaluate.Options(str(workdir), **options))


def _config():
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
  config.synthetic.num_eval_examples = NUM_EVAL_EXAMPLES
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 4
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(_config(), str(path))
  return path


@pytest.fixture(scope="module")
def checkpoint(workdir) -> restored.Checkpoint:
  return restored.restore(workdir)


def _training_eval(workdir: pathlib.Path, step: int) -> dict:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  (line,) = [line for line in lines if line["step"] == step and "eval_bits_per_token" in line]
  return line


def test_nelbo_matches_the_training_eval_within_standard_errors(workdir):
  results = run(workdir, num_t=4)
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
  small = restored.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(),
                                      num_t=2, num_batches=num_batches // 4, seed=1)
  large = restored.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(),
                                      num_t=2, num_batches=num_batches, seed=1)
  # Same seed and batches: the first quarter is the same estimates.
  np.testing.assert_array_equal(small, large[:len(small)])
  se_small = likelihood.summarise(small, SEQ_LEN)["bits_per_token_stderr"]
  se_large = likelihood.summarise(large, SEQ_LEN)["bits_per_token_stderr"]
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
    del params, rng, train_mode
    self.rows = batch["x"][:, 0]
    rows = batch["x"][:, 0].astype(jnp.float32)
    return models.LossOutput(objective=rows, nelbo=rows, metrics={})


def test_tiled_batch_gives_each_sequence_one_time_per_stratum():
  num_t, batch_size = 4, 5
  batch = {"x": jnp.arange(batch_size)[:, None] * jnp.ones((1, 3), jnp.int32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  model = _RowRecorder()
  per_sequence = likelihood.eval_step(model, sharding, num_t, None, batch,
                                      jax.random.PRNGKey(0))
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
  text = likelihood.summarise(nats, 8, word_pieces=True)
  bits = nats / (8 * math.log(2))
  assert text["bits_per_token"] == pytest.approx(bits.mean())
  assert text["bits_per_token_stderr"] == pytest.approx(bits.std(ddof=1) / 2)
  assert text["perplexity"] == pytest.approx(math.exp(36.0 / 8))
  images = likelihood.summarise(nats, 8, unit="dim")
  assert images["bits_per_dim"] == pytest.approx(bits.mean()) and "perplexity" not in images
  with pytest.raises(ValueError, match="unit"):
    likelihood.summarise(nats, 8, unit="pixel")


def test_sample_with_an_infill_template_keeps_the_given_text(workdir, tmp_path):
  template = "the ____ sat on the ___"
  results = run(workdir, nelbo=False, sample=True, num_samples=3, steps=6, infill=template,
                output_dir=str(tmp_path))
  text_file, ids_file = (tmp_path / f"samples_step_{TRAIN_STEPS}.{ext}" for ext in ("txt", "npy"))
  assert results["samples"]["files"] == [str(text_file), str(ids_file)]
  texts = text_file.read_text().splitlines()
  assert len(texts) == 3
  for text in texts:
    assert len(text) == SEQ_LEN and set(text) <= set(alphabet.ALPHABET)
    kept = [(i, c) for i, c in enumerate(template) if c != "_"]
    assert [text[i] for i, _ in kept] == [c for _, c in kept], text
  ids = np.load(ids_file)
  assert ids.shape == (3, SEQ_LEN)
  assert alphabet.decode(ids[0]) == texts[0]
  # A second run into the same folder keeps the first run's samples.
  again = run(workdir, nelbo=False, sample=True, num_samples=2, steps=6, output_dir=str(tmp_path))
  second = tmp_path / f"samples_step_{TRAIN_STEPS}_2.txt"
  assert again["samples"]["files"][0] == str(second) and len(second.read_text().splitlines()) == 2
  assert text_file.read_text().splitlines() == texts


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
  assert "8 samples (6 network evaluations)" in result.stdout
  assert "NELBO on eval" in result.stdout
  texts = (tmp_path / f"samples_step_{TRAIN_STEPS}.txt").read_text().splitlines()
  assert len(texts) == 8 and all(len(text) == SEQ_LEN and text.startswith(prefix) for text in texts), texts
  written = json.loads((tmp_path / f"results_step_{TRAIN_STEPS}.json").read_text())
  assert written["samples"]["prefix"] == prefix and written["samples"]["top_p"] == 0.9
  # The batch split over 8 devices (2 rows each, tiled to 8) gives the one-device numbers.
  one_device = likelihood.summarise(
      restored.nelbo_per_sequence(checkpoint, checkpoint.dataset.eval_batches(), num_t=4,
                                  num_batches=2, seed=0), SEQ_LEN)
  eight_devices = written["nelbo"]["eval"]
  assert eight_devices["num_sequences"] == one_device["num_sequences"] == 2 * BATCH_SIZE
  for key in ("bits_per_token", "bits_per_token_stderr"):
    assert eight_devices[key] == pytest.approx(one_device[key], rel=1e-5)


def test_zero_shot_on_a_text_file(workdir, tmp_path):
  path = tmp_path / "other.txt"
  path.write_text("The Cat sat on the mat, 42 times!\nA dog ran far away.\n" * 60)
  results = run(workdir, text_file=str(path), num_t=2, output_dir=str(tmp_path / "out"))
  (name,) = results["nelbo"]
  assert name == f"text_file:{path}"
  section = results["nelbo"][name]
  num_chars = len(" ".join(["the cat sat on the mat four two times a dog ran far away"] * 60))
  assert section["num_sequences"] == (num_chars // SEQ_LEN) // BATCH_SIZE * BATCH_SIZE
  assert np.isfinite(section["bits_per_token"]) and section["bits_per_token"] >= 0
  with pytest.raises(ValueError, match="text_file='/no/such/file.txt'"):
    run(workdir, text_file="/no/such/file.txt")


def _corpus(path: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  words = "the cat dog sat on mat and ran far away from home when rain fell".split()
  path.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(300)) + "\n")
  return path


def _tokens_config(corpus: pathlib.Path, data_dir: pathlib.Path, **options):
  config = tiny_config(dataset="tokens", data_dir=str(data_dir))
  config.tokens.update({"path": str(corpus), "vocab_size": 40, "validation_fraction": 0.2,
                        **options})
  return config


def test_zero_shot_text_for_word_pieces_needs_the_training_tokenizer(tmp_path):
  corpus = _corpus(tmp_path / "corpus.txt")
  trained_config = _tokens_config(corpus, tmp_path / "trained")
  trained = data_lib.create(trained_config)
  other_config = _tokens_config(corpus, tmp_path / "other", vocab_size=48)
  data_lib.create(other_config)
  with pytest.raises(ValueError, match="different tokenizer .* tokens.tokenizer="):
    trained.read_text(str(tokens.folder(other_config)))
  tokenizer = tokens.folder(trained_config) / "tokenizer.model"
  same_config = _tokens_config(corpus, tmp_path / "same", tokenizer=str(tokenizer))
  same = data_lib.create(same_config)
  from_folder = trained.read_text(str(tokens.folder(same_config)))
  # A folder prepared with the same tokenizer, or the text file itself: the same ids.
  np.testing.assert_array_equal(from_folder, trained.read_text(str(corpus)))
  assert same.vocab_size == trained.vocab_size == 40
  with pytest.raises(ValueError, match="not a corpus prepared by md4.data.tokens"):
    trained.read_text(str(tmp_path))


def test_missing_workdir_config_or_checkpoint_fails_naming_the_path(workdir, tmp_path):
  with pytest.raises(ValueError, match="/no/such/workdir"):
    run("/no/such/workdir")
  with pytest.raises(ValueError, match=f"{tmp_path}/config.json not found"):
    run(tmp_path)
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match=f"{tmp_path}/checkpoints does not exist"):
    run(tmp_path)
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path}/checkpoints holds no finished checkpoint"):
    run(tmp_path)
  with pytest.raises(ValueError, match=rf"step=7: .* available steps: \[{TRAIN_STEPS}\]"):
    run(workdir, step=7)
  with pytest.raises(ValueError, match="split='test'"):
    run(workdir, split="test")


def test_a_feature_the_model_lacks_is_a_clear_error(checkpoint):
  model = models.create(tiny_config(model_type="genmd4"), 27, (SEQ_LEN,))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
  draw = lambda **kwargs: model.sample(params, jax.random.PRNGKey(0), 2, steps=4,
                                       grid="cosine", **kwargs)
  with pytest.raises(ValueError, match=r"frames: the GenMD4 sampler .* \(supports: "
                                       r"\['ancestral', 'blocks', 'infill', 'llada', 'maskgit', "
                                       r"'prefix'\]\)"):
    draw(num_frames=3)
  with pytest.raises(ValueError, match="guidance: the GenMD4 sampler"):
    draw(guidance_scale=2.0)
  with pytest.raises(ValueError, match="remdm: the GenMD4 sampler"):
    draw(sampler="remdm")
  generate = lambda **kwargs: restored.generate(checkpoint, jax.random.PRNGKey(0),
                                                num_samples=2, steps=4, grid="cosine",
                                                top_p=1.0, **kwargs)
  with pytest.raises(ValueError, match="prefix: character 'T' at offset 0"):
    generate(prefix="The")
  with pytest.raises(ValueError, match="infill template makes 40 positions"):
    generate(infill="_" * 40)
