"""Generative perplexity: samples scored by a judge language model (GPT-2 family).

The judge is a Hugging Face checkpoint directory, read without torch or
transformers: config.json (GPT2Config: n_layer, n_head, n_embd,
n_positions, layer_norm_epsilon, activation_function), model.safetensors
(GPT2Model or GPT2LMHeadModel weights, "transformer." prefix or none; the
output layer is tied to wte) and tokenizer.json (the `tokenizers` format).
GPT-2 Large (gpt2-large) is the field's standard judge.

The round trip, as MDLM's compute_generative_perplexity does it: each sample
is decoded to text by md4's own tokenizer, re-tokenised by the judge's
(no BOS added), cut into consecutive windows of the judge's context
n_positions, and every token of a window but its first is scored given the
ones before it in the window. Generative perplexity is exp(total NLL /
tokens scored) over all samples. Unlike MDLM, nothing is truncated to the
model's length and no padding token is scored (docs/sampling.md).

Needs the `judge` extra: pip install 'md4[judge]'.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
Params = dict[str, Any]
# Windows are padded to a multiple of this, so a few lengths share one compilation.
_LENGTH_BUCKET = 64
_ACTIVATIONS = {"gelu_new": functools.partial(jax.nn.gelu, approximate=True),
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "gelu": functools.partial(jax.nn.gelu, approximate=False),
                "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of a GPT2Config that the forward pass reads."""

  num_layers: int
  num_heads: int
  width: int
  context: int
  layer_norm_eps: float = 1e-5
  activation: str = "gelu_new"
  scale_by_inverse_layer: bool = False


@dataclasses.dataclass
class Judge:
  """A loaded judge: its config, float32 parameters and tokenizer."""

  config: GPT2Config
  params: Params
  tokenizer: Any  # tokenizers.Tokenizer

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text).ids


def load(path: str | os.PathLike) -> Judge:
  """The GPT-2-family judge in directory path; ValueError saying what is missing."""
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("the judge needs safetensors and tokenizers: "
                      "pip install 'md4[judge]'") from error
  path = os.path.expanduser(os.fspath(path))
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.exists(os.path.join(path, name)):
      raise ValueError(f"judge={path!r} has no {name}: give a Hugging Face GPT-2 checkpoint "
                       "directory (config.json, model.safetensors, tokenizer.json)")
  with open(os.path.join(path, "config.json")) as f:
    raw = json.load(f)
  if raw.get("model_type", "gpt2") != "gpt2":
    raise ValueError(f"judge={path!r} is a {raw['model_type']!r} model; only GPT-2-family "
                     "judges (model_type 'gpt2') are implemented")
  activation = raw.get("activation_function", "gelu_new")
  if activation not in _ACTIVATIONS:
    raise ValueError(f"judge activation_function={activation!r}; valid: {sorted(_ACTIVATIONS)}")
  config = GPT2Config(num_layers=raw["n_layer"], num_heads=raw["n_head"], width=raw["n_embd"],
                      context=raw["n_positions"],
                      layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5), activation=activation,
                      scale_by_inverse_layer=raw.get("scale_attn_by_inverse_layer_idx", False))
  weights = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
  weights = {name.removeprefix("transformer."): value for name, value in weights.items()}
  params = {}
  names = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] + [
      f"h.{i}.{part}" for i in range(config.num_layers)
      for part in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                   "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                   "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
  for name in names:
    if name not in weights:
      raise ValueError(f"judge={path!r}: model.safetensors has no weight {name!r}")
    params[name] = jnp.asarray(weights[name], jnp.float32)
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  return Judge(config, params, tokenizer)


def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  mean = x.mean(-1, keepdims=True)
  variance = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + eps) * scale + bias


def logits(params: Params, config: GPT2Config, tokens: Array) -> Array:
  """GPT-2's next-token logits float32 [B, T, V] for tokens int32 [B, T], T <= context."""
  length = tokens.shape[1]
  heads, head_dim = config.num_heads, config.width // config.num_heads
  h = params["wte.weight"][tokens] + params["wpe.weight"][:length]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  activation = _ACTIVATIONS[config.activation]
  for i in range(config.num_layers):
    block = {name.removeprefix(f"h.{i}."): value for name, value in params.items()
             if name.startswith(f"h.{i}.")}
    p = block.__getitem__
    a = _layer_norm(h, p("ln_1.weight"), p("ln_1.bias"), config.layer_norm_eps)
    qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
    q, k, v = (x.reshape(*x.shape[:2], heads, head_dim) for x in jnp.split(qkv, 3, axis=-1))
    scale = 1.0 / math.sqrt(head_dim) / ((i + 1) if config.scale_by_inverse_layer else 1)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(h.shape)
    h = h + attended @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
    m = _layer_norm(h, p("ln_2.weight"), p("ln_2.bias"), config.layer_norm_eps)
    m = activation(m @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias"))
    h = h + m @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
  h = _layer_norm(h, params["ln_f.weight"], params["ln_f.bias"], config.layer_norm_eps)
  return h @ params["wte.weight"].T


@functools.partial(jax.jit, static_argnums=(1,))
def _window_nll(params: Params, config: GPT2Config, tokens: Array, scored: Array) -> Array:
  """Summed NLL [B] of tokens[:, 1:] where scored [B, T - 1]."""
  log_probs = jax.nn.log_softmax(logits(params, config, tokens[:, :-1]), axis=-1)
  nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(scored, nll, 0.0), axis=-1)


def windows(ids: list[int], context: int) -> list[list[int]]:
  """Consecutive windows of at most `context` ids."""
  return [ids[start:start + context] for start in range(0, len(ids), context)]


def generative_perplexity(judge: Judge, texts: list[str], batch_size: int = 8) -> dict[str, Any]:
  """{"generative_perplexity", "judge_nll_per_token", "judge_tokens"} of texts (module docstring)."""
  chunks = [window for text in texts for window in windows(judge.encode(text),
                                                            judge.config.context)]
  chunks = [chunk for chunk in chunks if len(chunk) > 1]
  if not chunks:
    raise ValueError("the samples make no window of 2 or more judge tokens to score")
  total_nll, total_tokens = 0.0, 0
  for start in range(0, len(chunks), batch_size):
    batch = chunks[start:start + batch_size]
    longest = max(len(chunk) for chunk in batch)
    length = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, judge.config.context)
    length = max(length, longest)
    tokens = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length - 1), bool)
    for row, chunk in enumerate(batch):
      tokens[row, :len(chunk)] = chunk
      scored[row, :len(chunk) - 1] = True
    nll = _window_nll(judge.params, judge.config, jnp.asarray(tokens), jnp.asarray(scored))
    total_nll += float(np.sum(np.asarray(nll, np.float64)))
    total_tokens += int(scored.sum())
  return {"generative_perplexity": math.exp(total_nll / total_tokens),
          "judge_nll_per_token": total_nll / total_tokens, "judge_tokens": total_tokens}
