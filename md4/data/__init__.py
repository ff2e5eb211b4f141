"""Input pipelines. `create(config)` returns a `Dataset` for `config.dataset`.

Every pipeline is grain, deterministic given `config.seed`, and sharded per
JAX process: process p of P reads examples p, p + P, p + 2P, ... and yields
batches of batch_size / P examples. Batches are dicts of numpy arrays:
"x" int32 [b, *example_shape] (token ids in [0, vocab_size)) and, for labelled
images, "label" int32 [b].
"""

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import grain
import jax
import ml_collections
import numpy as np

Batch = dict[str, np.ndarray]


class RandomAccessSource(Protocol):
  """What grain.MapDataset.source needs: a length and indexing."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


@dataclasses.dataclass
class Dataset:
  """One data source, ready for training and evaluation.

  Attributes:
    train: an endless, checkpointable grain iterator of training batches.
    eval_batches: returns a fresh iterator over the held-out split, one pass.
    vocab_size: number of token values V (the mask id is V).
    example_shape: shape of one example, (L,) for text, (H, W, 3) for images.
    decode: maps one example's ids to text (None for images).
    entropy_bits_per_token: exact entropy of the held-out data per token, when known.
    num_classes: number of class labels (0 when unlabelled).
  """

  train: grain.DatasetIterator
  eval_batches: Callable[[], Iterator[Batch]]
  vocab_size: int
  example_shape: tuple[int, ...]
  decode: Callable[[np.ndarray], str] | None = None
  entropy_bits_per_token: float | None = None
  num_classes: int = 0


def local_batch_size(batch_size: int) -> int:
  """The part of the global batch that this process reads."""
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                     f"processes ({jax.process_count()})")
  return batch_size // jax.process_count()


def train_iterator(source: RandomAccessSource, batch_size: int, seed: int,
                   transform: Callable[[Any], Batch] | None = None,
                   shuffle: bool = True) -> grain.DatasetIterator:
  """Endless batches: shuffled each epoch, this process's shard, global batch_size."""
  dataset = grain.MapDataset.source(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat()[jax.process_index()::jax.process_count()]
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = dataset.batch(local_batch_size(batch_size), drop_remainder=True)
  return iter(dataset.to_iter_dataset())


def eval_iterator_fn(source: RandomAccessSource, batch_size: int,
                     transform: Callable[[Any], Batch] | None = None
                     ) -> Callable[[], Iterator[Batch]]:
  """One pass over this process's shard of the held-out split, full batches only."""
  dataset = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = dataset.batch(local_batch_size(batch_size), drop_remainder=True)
  if len(dataset) == 0:
    raise ValueError(f"the held-out split has {len(source)} examples, fewer than one "
                     f"batch of {batch_size}: lower batch_size or enlarge the split")
  return lambda: iter(dataset)


def create(config: ml_collections.ConfigDict) -> Dataset:
  """Builds the dataset named by config.dataset."""
  if config.dataset == "synthetic":
    from md4.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.create(config)
  raise ValueError(f"unknown dataset {config.dataset!r}; valid: 'synthetic'")
