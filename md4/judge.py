"""Generative perplexity: samples scored by a judge language model (GPT-2 family).

The judge is a Hugging Face checkpoint directory, read without torch or
transformers: config.json (GPT2Config: n_layer, n_head, n_embd,
n_positions, layer_norm_epsilon, activation_function), model.safetensors
(GPT2Model or GPT2LMHeadModel weights, "transformer." prefix or none; the
output layer is tied to wte) and tokenizer.json (the `tokenizers` format).
GPT-2 Large (gpt2-large) is the field's standard judge.

Each sample comes as its documents' texts (md4's ids decoded and split at
its end-of-document id) and is scored by one of three conventions
(`CONVENTIONS`; docs/sampling.md compares them):

  "mdlm"  MDLM's compute_generative_perplexity (diffusion.py, with
          eval_retokenize), step by step: the documents are joined by the
          judge's own EOS id and, as MDLM's samples of wrapped data do, the
          sample starts with the judge's BOS id; ids are truncated to
          max_length, padded with EOS to the longest sample, and the last
          N mod batch_size samples are dropped; each padded row is cut into
          chunks of the judge's context, and the target at position j >= 1
          of a chunk is scored when it is not EOS or is the chunk's first
          EOS (so with BOS = EOS, as for GPT-2, no EOS is scored, and a
          sample without EOS or BOS has its first padding EOS scored).
          Generative perplexity is exp(summed NLL / tokens scored).
  "duo"   DUO's record_generative_perplexity (metrics.py, with
          _eval_retokenize): the same steps as MDLM's, line for line (it
          sums nll * mask where MDLM averages nll with weight mask; equal).
  "md4"   md4's round trip before it followed the field: the documents
          joined by "\n" as one text, no BOS, nothing truncated or dropped,
          consecutive windows of the judge's context, every token of a
          window but its first scored, EOS ("\n") like any other.

The judge's EOS and BOS ids come from its tokenizer files
(special_tokens_map.json or tokenizer_config.json, else config.json's
eos_token_id and bos_token_id).

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
  special_ids: dict[str, int]  # "eos" and "bos" -> id, where the tokenizer files name them.

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
  return Judge(config, params, tokenizer, special_ids(path, tokenizer, raw))


def special_ids(path: str, tokenizer: Any, config: dict[str, Any]) -> dict[str, int]:
  """{"eos": id, "bos": id} as the tokenizer files name them (module docstring)."""
  found = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    if not os.path.exists(os.path.join(path, name)):
      continue
    with open(os.path.join(path, name)) as f:
      tokens = json.load(f)
    for kind in ("eos", "bos"):
      token = tokens.get(kind + "_token")
      token = token.get("content") if isinstance(token, dict) else token
      if kind not in found and token is not None and tokenizer.token_to_id(token) is not None:
        found[kind] = tokenizer.token_to_id(token)
  for kind in ("eos", "bos"):
    if kind not in found and config.get(kind + "_token_id") is not None:
      found[kind] = config[kind + "_token_id"]
  return found


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


ScoredChunk = tuple[list[int], list[bool]]  # Judge ids [T] and which targets ids[1:] count.


def md4_chunks(judge: Judge, samples: list[list[str]], batch_size: int,
               max_length: int) -> list[ScoredChunk]:
  """md4's convention (module docstring); batch_size and max_length play no part."""
  del batch_size, max_length
  chunks = [window for documents in samples
            for window in windows(judge.encode("\n".join(documents)), judge.config.context)]
  return [(chunk, [True] * (len(chunk) - 1)) for chunk in chunks if len(chunk) > 1]


def mdlm_chunks(judge: Judge, samples: list[list[str]], batch_size: int,
                max_length: int) -> list[ScoredChunk]:
  """MDLM's and DUO's convention (module docstring)."""
  missing = [kind for kind in ("eos", "bos") if kind not in judge.special_ids]
  if missing:
    raise ValueError(f"the judge's tokenizer files name no {' or '.join(missing)} token, which "
                     "MDLM's and DUO's conventions need: add tokenizer_config.json or use "
                     "convention='md4'")
  eos, bos = judge.special_ids["eos"], judge.special_ids["bos"]
  rows = []
  for documents in samples:
    ids = [bos]
    for index, document in enumerate(documents):
      ids += ([eos] if index else []) + judge.encode(document)
    rows.append(ids[:max_length])
  longest = max((len(row) for row in rows), default=0)
  rows = [row + [eos] * (longest - len(row)) for row in rows]
  batch_size = min(batch_size, len(rows))
  rows = rows[:len(rows) // batch_size * batch_size] if rows else []
  chunks = []
  for row in rows:
    for chunk in windows(row, judge.config.context):
      eos_seen = np.cumsum(np.array(chunk) == eos)
      scored = [token != eos or seen == 1 for token, seen in zip(chunk[1:], eos_seen[1:])]
      if any(scored):
        chunks.append((chunk, scored))
  return chunks


# name -> (judge, samples, batch_size, max_length) -> the chunks to score.
CONVENTIONS = {"mdlm": mdlm_chunks, "duo": mdlm_chunks, "md4": md4_chunks}
DEFAULT_CONVENTION = "mdlm"


def check_convention(convention: str) -> None:
  """Raises ValueError unless convention is a key of CONVENTIONS."""
  if convention not in CONVENTIONS:
    raise ValueError(f"judge convention={convention!r}; valid: {sorted(CONVENTIONS)}")


def generative_perplexity(judge: Judge, samples: list[list[str]],
                          convention: str = DEFAULT_CONVENTION, batch_size: int = 8,
                          max_length: int | None = None) -> dict[str, Any]:
  """{"generative_perplexity", "judge_nll_per_token", "judge_tokens", "judge_convention"}.

  Args:
    judge: the loaded judge.
    samples: each sample's documents' texts, in order (md4's ids split at its
      end-of-document id and decoded; one text where there is none).
    convention: a key of CONVENTIONS (module docstring).
    batch_size: samples per judge batch; MDLM and DUO drop the last
      N mod batch_size samples (their perplexity_batch_size is 8).
    max_length: judge ids kept per sample by MDLM and DUO (their
      config.model.length); None: the judge's context.
  """
  check_convention(convention)
  max_length = judge.config.context if max_length is None else max_length
  chunks = CONVENTIONS[convention](judge, samples, batch_size, max_length)
  if not chunks:
    raise ValueError("the samples make no window of 2 or more judge tokens to score")
  total_nll, total_tokens = 0.0, 0
  for start in range(0, len(chunks), batch_size):
    batch = chunks[start:start + batch_size]
    longest = max(len(chunk) for chunk, _ in batch)
    length = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, judge.config.context)
    length = max(length, longest)
    tokens = np.zeros((batch_size, length), np.int32)
    scored = np.zeros((batch_size, length - 1), bool)
    for row, (chunk, chunk_scored) in enumerate(batch):
      tokens[row, :len(chunk)] = chunk
      scored[row, :len(chunk) - 1] = chunk_scored
    nll = _window_nll(judge.params, judge.config, jnp.asarray(tokens), jnp.asarray(scored))
    total_nll += float(np.sum(np.asarray(nll, np.float64)))
    total_tokens += int(scored.sum())
  return {"generative_perplexity": math.exp(total_nll / total_tokens),
          "judge_nll_per_token": total_nll / total_tokens, "judge_tokens": total_tokens,
          "judge_convention": convention}
