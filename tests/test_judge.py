"""Tests for md4.judge: a tiny random GPT-2 saved in the Hugging Face format, and a
NumPy forward pass written here independently of md4.judge."""

import json
import math

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

from md4 import judge as judge_lib  # pylint: disable=g-import-not-at-top

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3,
         "a masked diffusion model writes text in any order",
         "zebra " * 12, "hello world"]
LAYERS, HEADS, WIDTH, CONTEXT = 2, 2, 16, 16


def save_tiny_judge(directory, prefix: str = "") -> dict[str, np.ndarray]:
  """config.json, model.safetensors (random weights) and tokenizer.json; returns the weights."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(TEXTS * 4, trainer)
  tokenizer.save(str(directory / "tokenizer.json"))
  vocab_size = tokenizer.get_vocab_size()
  rng = np.random.default_rng(0)

  def normal(*shape, scale=0.3):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  weights = {"wte.weight": normal(vocab_size, WIDTH), "wpe.weight": normal(CONTEXT, WIDTH),
             "ln_f.weight": 1 + normal(WIDTH, scale=0.1), "ln_f.bias": normal(WIDTH, scale=0.1)}
  for i in range(LAYERS):
    weights.update({
        f"h.{i}.ln_1.weight": 1 + normal(WIDTH, scale=0.1), f"h.{i}.ln_1.bias": normal(WIDTH),
        f"h.{i}.attn.c_attn.weight": normal(WIDTH, 3 * WIDTH),
        f"h.{i}.attn.c_attn.bias": normal(3 * WIDTH),
        f"h.{i}.attn.c_proj.weight": normal(WIDTH, WIDTH), f"h.{i}.attn.c_proj.bias": normal(WIDTH),
        f"h.{i}.ln_2.weight": 1 + normal(WIDTH, scale=0.1), f"h.{i}.ln_2.bias": normal(WIDTH),
        f"h.{i}.mlp.c_fc.weight": normal(WIDTH, 4 * WIDTH), f"h.{i}.mlp.c_fc.bias": normal(4 * WIDTH),
        f"h.{i}.mlp.c_proj.weight": normal(4 * WIDTH, WIDTH),
        f"h.{i}.mlp.c_proj.bias": normal(WIDTH),
        # The causal-mask buffer older checkpoints carry: present, and ignored.
        f"h.{i}.attn.bias": np.tril(np.ones((CONTEXT, CONTEXT), np.float32))[None, None]})
  safetensors_numpy.save_file({prefix + name: value for name, value in weights.items()},
                              str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(dict(
      model_type="gpt2", n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH, n_positions=CONTEXT,
      vocab_size=vocab_size, layer_norm_epsilon=1e-5, activation_function="gelu_new")))
  return weights


def numpy_log_probs(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1, float64, one sequence, position by position."""

  def norm(x, name):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

  w = {name: value.astype(np.float64) for name, value in w.items()}
  length, head_dim = len(ids), WIDTH // HEADS
  h = w["wte.weight"][ids] + w["wpe.weight"][:length]
  for i in range(LAYERS):
    qkv = norm(h, f"h.{i}.ln_1") @ w[f"h.{i}.attn.c_attn.weight"] + w[f"h.{i}.attn.c_attn.bias"]
    out = np.zeros_like(h)
    for head in range(HEADS):
      cols = slice(head * head_dim, (head + 1) * head_dim)
      q, k, v = qkv[:, :WIDTH][:, cols], qkv[:, WIDTH:2 * WIDTH][:, cols], qkv[:, 2 * WIDTH:][:, cols]
      for t in range(length):
        s = k[:t + 1] @ q[t] / math.sqrt(head_dim)
        a = np.exp(s - s.max())
        out[t, cols] = (a / a.sum()) @ v[:t + 1]
    h = h + out @ w[f"h.{i}.attn.c_proj.weight"] + w[f"h.{i}.attn.c_proj.bias"]
    m = gelu(norm(h, f"h.{i}.ln_2") @ w[f"h.{i}.mlp.c_fc.weight"] + w[f"h.{i}.mlp.c_fc.bias"])
    h = h + m @ w[f"h.{i}.mlp.c_proj.weight"] + w[f"h.{i}.mlp.c_proj.bias"]
  z = norm(h, "ln_f") @ w["wte.weight"].T
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  return np.array([log_p[t - 1, ids[t]] for t in range(1, length)])


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_generative_perplexity_equals_a_direct_computation(tmp_path, prefix):
  weights = save_tiny_judge(tmp_path, prefix)
  judge = judge_lib.load(tmp_path)
  tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  nll, count = 0.0, 0
  for text in TEXTS:
    ids = tokenizer.encode(text).ids
    # Windows of the judge's context; the first token of each is not scored.
    for start in range(0, len(ids), CONTEXT):
      window = ids[start:start + CONTEXT]
      if len(window) > 1:
        nll -= numpy_log_probs(weights, window).sum()
        count += len(window) - 1
  assert count > 2 * CONTEXT  # Several windows, some texts longer than the context.
  result = judge_lib.generative_perplexity(judge, TEXTS, batch_size=3)
  assert result["judge_tokens"] == count
  assert result["generative_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_load_names_what_is_missing(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    judge_lib.load(tmp_path)
  save_tiny_judge(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
  with pytest.raises(ValueError, match="h.2.ln_1.weight"):
    judge_lib.load(tmp_path)
