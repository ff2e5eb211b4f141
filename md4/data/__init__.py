"""Data sources, one module each, and the registry that finds them.

A source is a module under md4/data/ that registers a `Source` when it is
imported: its name (the value of `config.dataset`), its options with their
defaults (they live under `config.<name>` in every config, so any source can
be picked on the command line), `create(config) -> Dataset` and, where there
is something to do once, `prepare(config, progress) -> summary`. Every module
of this package is imported on the first lookup, so a new source is one new
file; nothing else lists the names.

Every pipeline is grain, deterministic given `config.seed`, and sharded per
JAX process (`md4.data.pipeline`).
"""

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Mapping

import grain
import ml_collections
import numpy as np

from md4 import registry

Batch = dict[str, np.ndarray]
MODALITIES = ("text", "image")


@dataclasses.dataclass(frozen=True)
class KnownSource:
  """The true law of a source, for scoring samples against it (`md4.sample_quality`).

  A sequence is read as events (context, symbol): given its context the
  source draws the symbol from table[context]. Order-k Markov: the last k
  symbols and the next one; factorised: the position and its symbol; pairs:
  one context and the pair's two symbols as one.

  Attributes:
    log_prob: x int [N, L] -> float64 [N], log-probability in nats.
    events: x int [N, L] -> (contexts int [N, E], symbols int [N, E]).
    table: float64 [S, A], the law of a symbol given its context.
    context_probs: float64 [S], each context's share of the events of the
      source's own sequences.
    tokens_per_event: tokens an event's symbol stands for.
  """

  log_prob: Callable[[np.ndarray], np.ndarray]
  events: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  table: np.ndarray
  context_probs: np.ndarray
  tokens_per_event: int = 1


@dataclasses.dataclass
class Dataset:
  """One data source, ready for training and evaluation.

  Attributes:
    train: an endless, checkpointable grain iterator of training batches:
      "x" int32 [b, *example_shape] (ids in [0, vocab_size)) and, for labelled
      images, "label" int32 [b]; b is this process's share of the batch.
    eval_batches: returns a fresh iterator over the held-out split, one pass.
    vocab_size: number of token values V (the mask id is V).
    example_shape: shape of one example, (L,) for text, (H, W, 3) for images.
    modality: "text" (samples are written as text) or "image" (as PNG).
    decode: one example's ids [...] -> text (text sources).
    decode_documents: one example's ids [...] -> its documents' texts, split at
      the end-of-document id (sources that have one).
    encode: prompt text -> ids int32 [n], refusing what the vocabulary cannot
      represent (text sources).
    read_text: a path -> ids int32 [N] for zero-shot evaluation: a text file
      mapped to the vocabulary as the training text was (text sources).
    word_pieces: whether ids are word pieces (evaluation adds a perplexity).
    entropy_bits_per_token: exact entropy of the held-out data per token, when known.
    num_classes: number of class labels (0 when unlabelled).
    known_source: the true law of the data, when known (synthetic sources).
  """

  train: grain.DatasetIterator
  eval_batches: Callable[[], Iterator[Batch]]
  vocab_size: int
  example_shape: tuple[int, ...]
  modality: str = "text"
  decode: Callable[[np.ndarray], str] | None = None
  decode_documents: Callable[[np.ndarray], list[str]] | None = None
  encode: Callable[[str], np.ndarray] | None = None
  read_text: Callable[[str], np.ndarray] | None = None
  word_pieces: bool = False
  entropy_bits_per_token: float | None = None
  num_classes: int = 0
  known_source: KnownSource | None = None

  def documents(self, ids: np.ndarray) -> list[str]:
    """One example's documents' texts: one text where the source has no document ends."""
    return self.decode_documents(ids) if self.decode_documents else [self.decode(ids)]


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a model needs to know of a source, known from the config alone (no data read).

  Attributes:
    vocab_size: number of token values V.
    example_shape: shape of one example, (L,) for text, (H, W, 3) for images.
    num_classes: number of class labels (0 when unlabelled).
  """

  vocab_size: int
  example_shape: tuple[int, ...]
  num_classes: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
  """A registered data source.

  Attributes:
    name: the value of config.dataset that picks it; its options are config.<name>.
    options: option name -> default; the defaults' types are the options' types.
    create: config -> Dataset.
    prepare: (config, progress) -> a JSON-able summary of what is ready, or
      None when the source needs no preparation.
    shapes: config -> Shapes, without reading or preparing any data (md4.compile).
  """

  name: str
  options: Mapping[str, Any]
  create: Callable[[ml_collections.ConfigDict], Dataset]
  prepare: Callable[[ml_collections.ConfigDict, bool], dict[str, Any]] | None = None
  shapes: Callable[[ml_collections.ConfigDict], Shapes] | None = None


_REGISTRY = registry.Registry(__name__, __path__, "data source")
register = _REGISTRY.register
unregister = _REGISTRY.unregister
sources = _REGISTRY.entries  # Every registered source by name, the built-in ones imported first.


def get(name: str) -> Source:
  """The source called name; ValueError listing the valid names otherwise."""
  registered = sources()
  if name not in registered:
    raise ValueError(f"config.dataset={name!r} is not a data source; valid: "
                     f"{', '.join(sorted(registered))}")
  return registered[name]


def default_options() -> ml_collections.ConfigDict:
  """{source name: its options with their defaults}, for every source."""
  return ml_collections.ConfigDict(
      {name: dict(source.options) for name, source in sources().items()})


def options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The options of the source config.dataset names: config.<dataset>."""
  get(config.dataset)
  return config[config.dataset]


def _check_data_dir(config: ml_collections.ConfigDict) -> None:
  path = pathlib.Path(config.data_dir).expanduser()
  if path.exists() and not path.is_dir():
    raise ValueError(f"config.data_dir={config.data_dir} is a file: name a directory for "
                     "downloaded and prepared data (it is made if absent)")


def create(config: ml_collections.ConfigDict) -> Dataset:
  """Builds the dataset named by config.dataset."""
  _check_data_dir(config)
  dataset = get(config.dataset).create(config)
  if dataset.modality not in MODALITIES:
    raise ValueError(f"source {config.dataset!r} gave modality {dataset.modality!r}; "
                     f"valid: {MODALITIES}")
  return dataset


def shapes(config: ml_collections.ConfigDict) -> Shapes:
  """Vocabulary, example shape and classes of config.dataset, from the config alone."""
  source = get(config.dataset)
  if source.shapes is None:
    raise ValueError(f"data source {source.name!r} cannot tell its shapes without its data; "
                     "give it a `shapes` function (md4.data.Source)")
  return source.shapes(config)


def prepare_dataset(config: ml_collections.ConfigDict, progress: bool = True) -> dict[str, Any]:
  """Makes config.dataset ready to read offline; returns a summary."""
  source = get(config.dataset)
  _check_data_dir(config)
  summary = {"dataset": source.name}
  if source.prepare is not None:
    summary.update(source.prepare(config, progress))
  return summary
