"""Sharded, deterministic grain pipelines over random-access sources.

Global batch s of the training stream is examples sB .. sB + B - 1 of one
seeded global order (each epoch reshuffled), and process p of P reads its
contiguous block of b = B / P rows, pb .. pb + b - 1, so that the global
array assembled from the processes' blocks is the batch a single process
would read. The training iterator's checkpointable state is the next global
step, so a resumed run reads the batches an uninterrupted run would.
"""

import functools
from typing import Any, Callable, Iterator, Protocol

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]

# Threads that read batches ahead of the consumer, and how many batches they may hold.
_READ_THREADS = 4
PREFETCH_BATCHES = 8
_ENDLESS = 2**62  # Training steps in an "endless" iterator.


class RandomAccessSource(Protocol):
  """A length and indexing; optionally get_batch(indices [b]) -> Batch, read in one go."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Any:
    ...


class ChunkSource:
  """Non-overlapping chunks of a 1-D token array: example i is ids[start + iL : start + (i+1)L].

  `ids` may be a np.memmap; only the chunks that are read are paged in.
  """

  def __init__(self, ids: np.ndarray, length: int, start: int = 0,
               num_chunks: int | None = None):
    if length < 1:
      raise ValueError(f"seq_len must be >= 1, got {length}")
    available = (len(ids) - start) // length
    num_chunks = available if num_chunks is None else num_chunks
    if not 0 <= num_chunks <= available:
      raise ValueError(f"{num_chunks} chunks of {length} from offset {start} do not fit "
                       f"in {len(ids)} tokens")
    self.ids = ids
    self.length = length
    self.start = start
    self.num_chunks = num_chunks

  def __len__(self) -> int:
    return self.num_chunks

  def __getitem__(self, index: int) -> Batch:
    if not 0 <= index < self.num_chunks:
      raise IndexError(f"chunk {index} out of range [0, {self.num_chunks})")
    begin = self.start + index * self.length
    return {"x": np.asarray(self.ids[begin:begin + self.length], dtype=np.int32)}

  def get_batch(self, indices: np.ndarray) -> Batch:
    """Chunks `indices` [b] in one gather: {"x": int32 [b, L]}."""
    begins = self.start + np.asarray(indices, dtype=np.int64) * self.length
    return {"x": self.ids[begins[:, None] + np.arange(self.length)].astype(np.int32)}


def split_chunks(num_tokens: int, length: int, validation_fraction: float,
                 option: str = "validation_fraction") -> tuple[int, int]:
  """(train chunks, validation chunks): the last fraction of whole chunks is held out.

  option names the config key of validation_fraction in errors.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"{option} must be in (0, 1), got {validation_fraction}")
  num_chunks = num_tokens // length
  num_validation = int(round(num_chunks * validation_fraction))
  num_train = num_chunks - num_validation
  if num_validation < 1 or num_train < 1:
    raise ValueError(
        f"{num_tokens} tokens make {num_chunks} chunks of seq_len={length}; "
        f"{option}={validation_fraction} leaves {num_train} for training "
        f"and {num_validation} for validation (each needs >= 1): use more data, a "
        "shorter seq_len or another fraction")
  return num_train, num_validation


def local_batch_size(batch_size: int) -> int:
  """The part of the global batch that this process reads."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                     f"processes ({jax.process_count()})")
  return batch_size // jax.process_count()


def _read_options() -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=PREFETCH_BATCHES)


class _GlobalOrder:
  """Position in the endless training stream -> example index.

  Epoch e (positions eN .. eN + N - 1) visits every example once, in a
  permutation seeded by (seed, e) when shuffling, else in order.
  """

  def __init__(self, num_examples: int, seed: int, shuffle: bool):
    self.num_examples = num_examples
    self.seed = seed
    self.shuffle = shuffle
    # A batch usually spans at most two epochs; threads reading ahead share the cache.
    self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

  def _make_permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_examples)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs, indices = np.divmod(positions, self.num_examples)
    if not self.shuffle:
      return indices
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      indices[in_epoch] = self._permutation(int(epoch))[indices[in_epoch]]
    return indices


def _local_positions(step: int, batch_size: int) -> np.ndarray:
  """Stream positions of this process's rows of global batch `step` [b]."""
  local = local_batch_size(batch_size)
  return step * batch_size + jax.process_index() * local + np.arange(local)


def _read_batch(source: RandomAccessSource, indices: np.ndarray, positions: np.ndarray,
                seed: int, transform: Callable[[Any], Batch] | None,
                random_transform: Callable[[Any, np.random.Generator], Any] | None) -> Batch:
  """Examples `indices` of `source`, transformed and stacked; source.get_batch when it has one."""
  if transform is None and random_transform is None and hasattr(source, "get_batch"):
    return source.get_batch(indices)
  examples = []
  for index, position in zip(indices.tolist(), positions.tolist()):
    example = source[index]
    if random_transform is not None:
      example = random_transform(example, np.random.default_rng([seed, 1, position]))
    if transform is not None:
      example = transform(example)
    examples.append(example)
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def train_iterator(source: RandomAccessSource, batch_size: int, seed: int,
                   transform: Callable[[Any], Batch] | None = None,
                   shuffle: bool = True,
                   random_transform: Callable[[Any, np.random.Generator], Any] | None = None,
                   ) -> grain.DatasetIterator:
  """Endless batches: reshuffled each epoch, this process's shard, global batch_size.

  Global batch s holds stream positions sB .. sB + B - 1 (see _GlobalOrder);
  process p reads its block of rows pb .. pb + b - 1. The iterator's state is the next s.
  `random_transform(example, rng)` draws from an rng seeded by (seed, stream
  position), so augmentation does not depend on the number of processes.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if len(source) < 1:
    raise ValueError("the training split is empty")
  local_batch_size(batch_size)
  order = _GlobalOrder(len(source), seed, shuffle)

  def read(step: int) -> Batch:
    positions = _local_positions(step, batch_size)
    return _read_batch(source, order(positions), positions, seed, transform,
                       random_transform)

  steps = grain.MapDataset.range(_ENDLESS).map(read)
  return iter(steps.to_iter_dataset(_read_options()))


def eval_iterator_fn(source: RandomAccessSource, batch_size: int,
                     transform: Callable[[Any], Batch] | None = None
                     ) -> Callable[[], Iterator[Batch]]:
  """One pass over the held-out split in order, full global batches only.

  Every process sees the same number of batches; process p reads its block
  of rows pb .. pb + b - 1 of each.
  """
  local_batch_size(batch_size)
  num_batches = len(source) // batch_size
  if num_batches == 0:
    raise ValueError(f"the held-out split has {len(source)} examples, fewer than one "
                     f"batch of {batch_size}: lower batch_size or enlarge the split")

  def read(step: int) -> Batch:
    positions = _local_positions(step, batch_size)
    return _read_batch(source, positions, positions, 0, transform, None)

  batches = grain.MapDataset.range(num_batches).map(read).to_iter_dataset(_read_options())
  return lambda: SizedIterator(iter(batches), num_batches)


class SizedIterator:
  """An iterator that knows how many items it yields in all (for progress bars)."""

  def __init__(self, iterator: Iterator[Batch], length: int):
    self._iterator = iterator
    self._length = length

  def __iter__(self) -> "SizedIterator":
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def __len__(self) -> int:
    return self._length
