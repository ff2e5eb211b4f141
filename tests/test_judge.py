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
def test_md4_convention_equals_a_direct_computation(tmp_path, prefix):
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
  result = judge_lib.generative_perplexity(judge, [[text] for text in TEXTS], convention="md4",
                                           batch_size=3)
  assert result["judge_tokens"] == count
  assert result["generative_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


# Samples as documents: EOS between documents (in the middle) and after the last (at the end).
SAMPLES = [["the quick brown fox", "jumps over the lazy dog"],
           ["zebra zebra", ""],
           ["a masked diffusion model writes text in any order " * 2],
           ["hello", "world", "the dog"],
           ["hello world"]]
EOS_TEXT = "<|endoftext|>"


def mdlm_reference(weights, tokenizer, texts, batch_size, max_length, eos, bos) -> tuple:
  """MDLM's compute_generative_perplexity, step by step, for samples decoded to texts with
  EOS written as the judge's EOS token and a leading BOS (its wrapped samples' first token)."""
  # eval_retokenize: truncation=True, padding=True (pad = eos), max_length.
  rows = [tokenizer.encode(text).ids[:max_length] for text in texts]
  longest = max(len(row) for row in rows)
  samples = np.array([row + [eos] * (longest - len(row)) for row in rows])
  batch_size = min(batch_size, samples.shape[0])
  num_batches = samples.shape[0] // batch_size
  total, weight = 0.0, 0
  for i in range(num_batches):
    batch = samples[i * batch_size:(i + 1) * batch_size]
    for start in range(0, batch.shape[1], CONTEXT):  # torch.split(..., eval_context_size)
      for sample_chunk in batch[:, start:start + CONTEXT]:
        nlls = -numpy_log_probs(weights, list(sample_chunk)) if len(sample_chunk) > 1 else []
        first_eos = np.cumsum(sample_chunk == eos) == 1
        token_mask = sample_chunk != eos
        mask = first_eos[1:] | token_mask[1:]
        total += float(np.sum(np.asarray(nlls) * mask))
        weight += int(mask.sum())
  return math.exp(total / weight), weight


def duo_reference(weights, tokenizer, texts, batch_size, max_length, eos, bos) -> tuple:
  """DUO's record_generative_perplexity, step by step (nlls * valid_tokens summed)."""
  encoded = [tokenizer.encode(text).ids for text in texts]
  encoded = [ids[:max_length] for ids in encoded]
  width = max(map(len, encoded))
  padded = np.full((len(encoded), width), eos)
  for row, ids in enumerate(encoded):
    padded[row, :len(ids)] = ids
  batch_size = min(batch_size, len(padded))
  mean_value, weight = 0.0, 0
  for i in range(len(padded) // batch_size):
    for chunk_start in range(0, width, CONTEXT):
      chunk = padded[i * batch_size:(i + 1) * batch_size, chunk_start:chunk_start + CONTEXT]
      for sample_chunk in chunk:
        if len(sample_chunk) < 2:
          continue
        nlls = -numpy_log_probs(weights, list(sample_chunk))
        valid = (np.cumsum(sample_chunk == eos) == 1)[1:] + (sample_chunk != eos)[1:]
        mean_value += float((nlls * valid).sum())
        weight += int(valid.sum())
  return math.exp(mean_value / weight), weight


@pytest.mark.parametrize("convention,reference", [("mdlm", mdlm_reference),
                                                  ("duo", duo_reference)])
@pytest.mark.parametrize("batch_size,max_length", [(2, CONTEXT), (3, 2 * CONTEXT + 5)])
def test_field_conventions_equal_their_published_procedures(tmp_path, convention, reference,
                                                            batch_size, max_length):
  weights = save_tiny_judge(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": EOS_TEXT, "eos_token": {"content": EOS_TEXT}}))
  judge = judge_lib.load(tmp_path)
  tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  eos = tokenizer.token_to_id(EOS_TEXT)
  assert judge.special_ids == {"eos": eos, "bos": eos}
  # As the published code sees them: batch_decode keeps EOS and BOS as text.
  texts = [EOS_TEXT + EOS_TEXT.join(documents) for documents in SAMPLES]
  expected, count = reference(weights, tokenizer, texts, batch_size, max_length, eos, eos)
  result = judge_lib.generative_perplexity(judge, SAMPLES, convention=convention,
                                           batch_size=batch_size, max_length=max_length)
  assert result["judge_tokens"] == count
  assert result["generative_perplexity"] == pytest.approx(expected, rel=1e-4)


def test_field_conventions_score_the_first_eos_when_bos_differs(tmp_path):
  """With a BOS other than EOS, the first EOS of each chunk counts and the later ones do
  not; a sample with no EOS has its first padding EOS scored."""
  weights = save_tiny_judge(tmp_path)
  tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  eos, bos = tokenizer.token_to_id(EOS_TEXT), tokenizer.encode("z").ids[0]
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos,
                                                    "bos_token_id": bos}))
  judge = judge_lib.load(tmp_path)
  samples = [["hello", "world", "the dog"], ["hello world"]]
  texts = ["z" + EOS_TEXT.join(documents) for documents in samples]
  expected, count = mdlm_reference(weights, tokenizer, texts, 2, CONTEXT, eos, bos)
  result = judge_lib.generative_perplexity(judge, samples, convention="mdlm", batch_size=2)
  assert result["judge_tokens"] == count
  assert result["generative_perplexity"] == pytest.approx(expected, rel=1e-4)
  non_eos = sum(len(tokenizer.encode(text).ids) - 1 for text in texts) - 2
  assert count == non_eos + 2  # One EOS each: the first of sample 0, the first pad of 1.


def test_conventions_differ_and_unknown_names_are_refused(tmp_path):
  save_tiny_judge(tmp_path)
  judge = judge_lib.load(tmp_path)
  with pytest.raises(ValueError, match="name no eos or bos"):
    judge_lib.generative_perplexity(judge, SAMPLES, convention="mdlm")
  with pytest.raises(ValueError, match="valid: \\['duo', 'md4', 'mdlm'\\]"):
    judge_lib.generative_perplexity(judge, SAMPLES, convention="gpt")


def test_load_names_what_is_missing(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    judge_lib.load(tmp_path)
  save_tiny_judge(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
  with pytest.raises(ValueError, match="h.2.ln_1.weight"):
    judge_lib.load(tmp_path)
