"""`md4.load`: a trained model in a notebook or a script.

    import md4
    model = md4.load("/tmp/md4_quickstart")
    tokens = model.sample(4, steps=64)
    texts = model.decode(tokens)
    bits = model.nelbo(texts)

Every argument left out is the workdir's config's (the sampler, its steps,
grid and options, the number of samples), as `md4.evaluate` does. Orbax's and
md4's logs are kept below ERROR unless `verbose=True`.
"""

import contextlib
import dataclasses
import logging as python_logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from md4 import restored


@contextlib.contextmanager
def _logs(verbose: bool) -> Iterator[None]:
  """absl's log (Orbax's and md4's) at ERROR inside the block unless verbose."""
  logger = python_logging.getLogger("absl")
  level = logger.level
  if not verbose:
    logger.setLevel(python_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


@dataclasses.dataclass
class TrainedModel:
  """A workdir's EMA parameters with the config, data and model it was trained with.

  Attributes:
    checkpoint: what `md4.restored.restore` returns (params, model, dataset, mesh).
    verbose: whether Orbax's and md4's logs are shown.
  """

  checkpoint: restored.Checkpoint
  verbose: bool = False

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The config the checkpoint was trained with."""
    return self.checkpoint.config

  @property
  def step(self) -> int:
    """The checkpoint's training step."""
    return self.checkpoint.step

  def sample(self, num_samples: int | None = None, *, prefix: str | None = None,
             infill: str | None = None, steps: int | None = None, grid: str | None = None,
             top_p: float | None = None, sampler: str | None = None,
             sampler_options: dict[str, Any] | None = None, seed: int = 0) -> np.ndarray:
    """Token ids int32 [num_samples, *example_shape] (text: [N, L]; images: [N, H, W, 3]).

    prefix: text every sample starts with; infill: a template whose "_" marks
    the positions to generate (`md4.restored.infill_template`). Same seed,
    same samples.
    """
    with _logs(self.verbose):
      drawn = restored.generate(
          self.checkpoint, jax.random.PRNGKey(seed), num_samples=num_samples, steps=steps,
          grid=grid, top_p=top_p, prefix=prefix, infill=infill, sampler=sampler,
          sampler_options=sampler_options)
    return np.asarray(drawn.tokens)

  def decode(self, tokens: np.ndarray) -> list[str]:
    """The texts of token ids [N, L] (one text per row), as the samples files show them."""
    dataset = self.checkpoint.dataset
    if dataset.decode is None:
      raise ValueError(f"decode needs a model of text; this one was trained on "
                       f"{self.config.dataset!r} ({dataset.modality}), whose tokens are "
                       "already pixel values (tokens.astype(np.uint8) is the image)")
    return [dataset.decode(row) for row in np.asarray(tokens)]

  def nelbo(self, data: str | Sequence[str] | np.ndarray, *, num_t: int = 8,
            seed: int = 0) -> np.ndarray:
    """The NELBO of each text (or example) in bits per token, float64 [N].

    A text is encoded as prompts are (a character the vocabulary lacks is an
    error) and scored in windows of seq_len tokens: its bound is over its
    whole windows, the tokens after the last one left out; a text shorter
    than seq_len is an error. An array is N examples [N, *example_shape].
    Each window's estimate averages num_t stratified times (`md4.likelihood`).
    """
    windows, owners = self._windows(data)
    batch_size = self.config.batch_size
    padded = -len(windows) % batch_size  # The eval step takes whole batches: pad with copies.
    rows = np.concatenate([windows, np.repeat(windows[:1], padded, axis=0)])
    batches = ({"x": rows[start:start + batch_size]} for start in range(0, len(rows), batch_size))
    with _logs(self.verbose):
      nats = restored.nelbo_per_sequence(self.checkpoint, batches, num_t=num_t,
                                         seed=seed)[:len(windows)]
    num_tokens = math.prod(self.checkpoint.dataset.example_shape)
    totals = np.bincount(owners, weights=nats)
    counts = np.bincount(owners)
    return totals / (counts * num_tokens * math.log(2))

  def _windows(self, data: str | Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(examples int32 [W, *example_shape], the index of the text or example each is from [W])."""
    example_shape = self.checkpoint.dataset.example_shape
    if isinstance(data, np.ndarray):
      if data.shape[1:] != example_shape or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"nelbo takes token ids [N, {', '.join(map(str, example_shape))}]; "
                         f"got {data.dtype} {data.shape}")
      vocab_size = self.checkpoint.dataset.vocab_size
      if data.size and (data.min() < 0 or data.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}); got {data.min()} to "
                         f"{data.max()}")
      return data.astype(np.int32), np.arange(len(data))
    texts = [data] if isinstance(data, str) else list(data)
    if not texts:
      raise ValueError("nelbo got no text")
    length = example_shape[0]
    windows, owners = [], []
    for index, text in enumerate(texts):
      ids = restored.encode(self.checkpoint, text, f"text {index}")
      if len(ids) < length:
        raise ValueError(f"text {index} makes {len(ids)} tokens, fewer than the model's "
                         f"seq_len={length}: give at least one whole window")
      count = len(ids) // length
      windows.append(ids[:count * length].reshape(count, length))
      owners += [index] * count
    return np.concatenate(windows), np.asarray(owners)


def load(workdir: str | os.PathLike, step: int | None = None, *, batch_size: int | None = None,
         dtype: str | None = None, verbose: bool = False) -> TrainedModel:
  """The EMA parameters of checkpoint `step` (default: the latest) of a training workdir.

  batch_size: sequences per NELBO batch (default: the config's); dtype:
  "float32" or "bfloat16" (default: the config's model.dtype); verbose: show
  Orbax's and md4's logs.
  """
  with _logs(verbose):
    checkpoint = restored.restore(workdir, step, batch_size, dtype)
  return TrainedModel(checkpoint, verbose)
