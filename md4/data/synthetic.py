"""Sources of known entropy over the text8 alphabet, for likelihood checks.

`config.data.kind` picks one:
  markov      a seeded order-k Markov chain; each sequence starts from the
              stationary distribution of k-grams, so a sequence of length L has
              entropy H(pi_k) + (L - k) h, with h the entropy rate.
  factorised  independent positions, position i drawn from its own p_i.
  pairs       positions (2j, 2j + 1) drawn jointly from one seeded table.

Example i of a split is a pure function of (seed, split, i), so every
pipeline over it is deterministic and random-access.
"""

import bisect
import math

import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import alphabet

KINDS = ("markov", "factorised", "pairs")
_SPLIT_IDS = {"train": 0, "eval": 1}
_TRAIN_SIZE = 2**40  # Effectively endless.


def entropy_nats(p: np.ndarray, axis: int = -1) -> np.ndarray:
  """Entropy of distributions p along axis, 0 log 0 = 0."""
  p = np.asarray(p, dtype=np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


class MarkovChain:
  """A seeded order-k Markov chain over `vocab_size` symbols.

  Rows of the transition table are Dirichlet(concentration) draws: a small
  concentration gives peaked rows and a low entropy rate.
  """

  def __init__(self, vocab_size: int, order: int, concentration: float, seed: int):
    if order < 1:
      raise ValueError(f"data.order must be >= 1, got {order}")
    if concentration <= 0:
      raise ValueError(f"data.concentration must be > 0, got {concentration}")
    self.vocab_size = vocab_size
    self.order = order
    num_states = vocab_size**order
    rng = np.random.default_rng(seed)
    self.transitions = rng.dirichlet(np.full(vocab_size, concentration), size=num_states)
    self.cumulative = np.cumsum(self.transitions, axis=-1)
    self.cumulative[:, -1] = 1.0
    self._cumulative_rows = self.cumulative.tolist()  # bisect on lists is the fast path.
    self.stationary = self._stationary_states()

  def _next_state(self, state: np.ndarray, symbol: np.ndarray) -> np.ndarray:
    """State = the last k symbols as a base-V number, oldest most significant."""
    return (state % (self.vocab_size**(self.order - 1))) * self.vocab_size + symbol

  def _stationary_states(self) -> np.ndarray:
    """Stationary distribution over k-gram states, by power iteration [V^k]."""
    num_states = self.vocab_size**self.order
    pi = np.full(num_states, 1.0 / num_states)
    states = np.arange(num_states)
    for _ in range(10_000):
      new_pi = np.zeros(num_states)
      for symbol in range(self.vocab_size):
        np.add.at(new_pi, self._next_state(states, symbol), pi * self.transitions[:, symbol])
      if np.abs(new_pi - pi).sum() < 1e-13:
        return new_pi
      pi = new_pi
    raise RuntimeError("Markov chain did not mix: raise data.concentration")

  def entropy_rate(self) -> float:
    """h = sum_s pi(s) H(P(. | s)) in nats per symbol."""
    return float(self.stationary @ entropy_nats(self.transitions))

  def sequence_entropy(self, length: int) -> float:
    """Exact entropy in nats of a length-L sequence started from stationarity."""
    if length < self.order:
      raise ValueError(f"seq_len={length} is shorter than the Markov order {self.order}")
    return float(entropy_nats(self.stationary)) + (length - self.order) * self.entropy_rate()

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    """One sequence int32 [L]."""
    state = int(np.searchsorted(np.cumsum(self.stationary), rng.random()))
    state = min(state, len(self.stationary) - 1)
    digits = [(state // self.vocab_size**(self.order - 1 - j)) % self.vocab_size
              for j in range(self.order)]
    out = np.empty(length, dtype=np.int32)
    out[:self.order] = digits
    uniforms = rng.random(length).tolist()
    history = self.vocab_size**(self.order - 1)
    for position in range(self.order, length):
      symbol = bisect.bisect_right(self._cumulative_rows[state], uniforms[position])
      out[position] = symbol
      state = (state % history) * self.vocab_size + symbol
    return out


class Factorised:
  """Independent positions with seeded marginals p_i [L, V]."""

  def __init__(self, vocab_size: int, length: int, concentration: float, seed: int):
    rng = np.random.default_rng(seed)
    self.marginals = rng.dirichlet(np.full(vocab_size, concentration), size=length)
    self.cumulative = np.cumsum(self.marginals, axis=-1)

  def sequence_entropy(self, length: int) -> float:
    return float(entropy_nats(self.marginals).sum())

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    u = rng.random((length, 1))
    symbols = (u > self.cumulative).sum(axis=-1)
    return np.minimum(symbols, self.marginals.shape[-1] - 1).astype(np.int32)


class Pairs:
  """Pairs of positions drawn jointly from one seeded table [V, V]."""

  def __init__(self, vocab_size: int, concentration: float, seed: int):
    rng = np.random.default_rng(seed)
    self.vocab_size = vocab_size
    self.joint = rng.dirichlet(np.full(vocab_size**2, concentration))
    self.cumulative = np.cumsum(self.joint)

  def sequence_entropy(self, length: int) -> float:
    if length % 2:
      raise ValueError(f"the pairs source needs an even seq_len, got {length}")
    return length // 2 * float(entropy_nats(self.joint))

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    pair = np.searchsorted(self.cumulative, rng.random(length // 2), side="right")
    pair = np.minimum(pair, self.vocab_size**2 - 1)
    return np.stack([pair // self.vocab_size, pair % self.vocab_size], -1).reshape(-1).astype(np.int32)


def make_process(config: ml_collections.ConfigDict):
  """The source process named by config.data.kind."""
  kind = config.data.kind
  vocab_size = alphabet.VOCAB_SIZE
  if kind == "markov":
    return MarkovChain(vocab_size, config.data.order, config.data.concentration,
                       config.data.source_seed)
  if kind == "factorised":
    return Factorised(vocab_size, config.seq_len, config.data.concentration,
                      config.data.source_seed)
  if kind == "pairs":
    return Pairs(vocab_size, config.data.concentration, config.data.source_seed)
  raise ValueError(f"unknown data.kind {kind!r} for dataset 'synthetic'; valid: {KINDS}")


class SyntheticSplit:
  """Random-access view of one split: example i is a pure function of (seed, split, i)."""

  def __init__(self, process, length: int, seeds: tuple[int, ...], split: str,
               size: int):
    self.process = process
    self.length = length
    self.seeds = seeds
    self.split_id = _SPLIT_IDS[split]
    self.size = size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([*self.seeds, self.split_id, int(index)])
    return {"x": self.process.sample(rng, self.length)}


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  process = make_process(config)
  length = config.seq_len
  # Training draws depend on config.seed; the held-out split only on the source.
  train = SyntheticSplit(process, length, (config.data.source_seed, config.seed),
                         "train", _TRAIN_SIZE)
  held_out = SyntheticSplit(process, length, (config.data.source_seed,), "eval",
                            config.data.num_eval_examples)
  return data_lib.Dataset(
      train=data_lib.train_iterator(train, config.batch_size, config.seed, shuffle=False),
      eval_batches=data_lib.eval_iterator_fn(held_out, config.batch_size),
      vocab_size=alphabet.VOCAB_SIZE,
      example_shape=(length,),
      decode=alphabet.decode,
      entropy_bits_per_token=process.sequence_entropy(length) / (length * math.log(2)),
  )
