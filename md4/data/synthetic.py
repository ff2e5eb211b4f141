"""Sources of known entropy over the text8 alphabet, for likelihood checks.

`config.synthetic.kind` picks one:
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
from md4.data import chars
from md4.data import pipeline

KINDS = ("markov", "factorised", "pairs")
_SPLIT_IDS = {"train": 0, "eval": 1}
_TRAIN_SIZE = 2**40  # Effectively endless.
_MAX_TABLE_SIZE = 2**24

OPTIONS = {
    "kind": "markov",           # markov, factorised or pairs.
    "order": 1,                 # Markov order k: the next symbol depends on the last k.
    "concentration": 0.1,       # Dirichlet concentration of the tables: lower, lower entropy.
    "source_seed": 0,           # Seeds the tables and the held-out split.
    "num_eval_examples": 1024,  # Size of the held-out split.
}


def entropy_nats(p: np.ndarray, axis: int = -1) -> np.ndarray:
  """Entropy of distributions p along axis, 0 log 0 = 0."""
  p = np.asarray(p, dtype=np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def _check_concentration(concentration: float) -> None:
  if not concentration > 0:
    raise ValueError(f"synthetic.concentration must be > 0, got {concentration}")


class MarkovChain:
  """A seeded order-k Markov chain over `vocab_size` symbols.

  Rows of the transition table are Dirichlet(concentration) draws: a small
  concentration gives peaked rows and a low entropy rate.
  """

  def __init__(self, vocab_size: int, order: int, concentration: float, seed: int):
    if order < 1:
      raise ValueError(f"synthetic.order must be >= 1, got {order}")
    if vocab_size**(order + 1) > _MAX_TABLE_SIZE:
      raise ValueError(f"synthetic.order={order} needs a transition table of {vocab_size}^"
                       f"{order + 1} entries, more than {_MAX_TABLE_SIZE}: lower synthetic.order")
    _check_concentration(concentration)
    self.vocab_size = vocab_size
    self.order = order
    num_states = vocab_size**order
    rng = np.random.default_rng(seed)
    self.transitions = rng.dirichlet(np.full(vocab_size, concentration), size=num_states)
    self.cumulative = np.cumsum(self.transitions, axis=-1)
    self.cumulative[:, -1] = 1.0
    self._cumulative_rows = self.cumulative.tolist()  # bisect on lists is the fast path.
    self.stationary = self._stationary_states()
    self._stationary_cumulative = np.cumsum(self.stationary)

  def _next_state(self, state: np.ndarray, symbol: np.ndarray) -> np.ndarray:
    """State = the last k symbols as a base-V number, oldest most significant."""
    return (state % (self.vocab_size**(self.order - 1))) * self.vocab_size + symbol

  def _stationary_states(self) -> np.ndarray:
    """Stationary distribution over k-gram states [V^k], by lazy power iteration.

    The lazy step pi <- (pi + pi P) / 2 has the same fixed points as pi P and
    also converges on periodic chains.
    """
    vocab_size = self.vocab_size
    history = vocab_size**(self.order - 1)
    # transitions[oldest, rest, symbol]: state (oldest, rest) moves to (rest, symbol).
    transitions = self.transitions.reshape(vocab_size, history, vocab_size)
    pi = np.full(vocab_size**self.order, vocab_size**-self.order)
    for _ in range(100_000):
      moved = np.einsum("or,ors->rs", pi.reshape(vocab_size, history), transitions)
      moved = moved.reshape(-1)
      if np.abs(moved - pi).sum() < 1e-13:
        return moved / moved.sum()
      pi = 0.5 * (pi + moved)
    raise RuntimeError("Markov chain did not mix: raise synthetic.concentration")

  def entropy_rate(self) -> float:
    """h = sum_s pi(s) H(P(. | s)) in nats per symbol."""
    return float(self.stationary @ entropy_nats(self.transitions))

  def sequence_entropy(self, length: int) -> float:
    """Exact entropy in nats of a length-L sequence started from stationarity."""
    if length < self.order:
      raise ValueError(f"seq_len={length} is shorter than the Markov order {self.order}")
    return float(entropy_nats(self.stationary)) + (length - self.order) * self.entropy_rate()

  def _start_states(self, u: np.ndarray) -> np.ndarray:
    """Inverse CDF of the stationary distribution at uniforms u [...]."""
    states = np.searchsorted(self._stationary_cumulative, u, side="right")
    return np.minimum(states, len(self.stationary) - 1)

  def states(self, x: np.ndarray) -> np.ndarray:
    """The state before each of positions k..L-1 int64 [N, L - k] of x [N, L]."""
    x = np.asarray(x, np.int64)
    length = x.shape[1]
    states = np.zeros((x.shape[0], length - self.order + 1), np.int64)
    for j in range(self.order):
      states = states * self.vocab_size + x[:, j:length - self.order + 1 + j]
    return states[:, :-1]

  def known_source(self) -> data_lib.KnownSource:
    """Events: (the last k symbols, the next one) at positions k..L-1."""

    def events(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      return self.states(x), np.asarray(x, np.int64)[:, self.order:]

    def log_prob(x: np.ndarray) -> np.ndarray:
      x = np.asarray(x, np.int64)
      start = np.zeros(x.shape[0], np.int64)
      for j in range(self.order):
        start = start * self.vocab_size + x[:, j]
      contexts, symbols = events(x)
      with np.errstate(divide="ignore"):
        return (np.log(self.stationary[start])
                + np.log(self.transitions[contexts, symbols]).sum(axis=1))

    return data_lib.KnownSource(log_prob, events, self.transitions, self.stationary)

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    """One sequence int32 [L]."""
    state = int(self._start_states(rng.random()))
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

  def sample_batch(self, rngs: list[np.random.Generator], length: int) -> np.ndarray:
    """[len(rngs), L]: row b equals sample(rngs[b], length), computed across rows at once."""
    starts = np.array([rng.random() for rng in rngs])
    uniforms = np.stack([rng.random(length) for rng in rngs])
    states = self._start_states(starts)
    out = np.empty((len(rngs), length), dtype=np.int32)
    for j in range(self.order):
      out[:, j] = (states // self.vocab_size**(self.order - 1 - j)) % self.vocab_size
    history = self.vocab_size**(self.order - 1)
    for position in range(self.order, length):
      # bisect_right: the number of cumulative entries <= u.
      symbols = (self.cumulative[states] <= uniforms[:, position:position + 1]).sum(axis=-1)
      out[:, position] = symbols
      states = (states % history) * self.vocab_size + symbols
    return out


class Factorised:
  """Independent positions with seeded marginals p_i [L, V]."""

  def __init__(self, vocab_size: int, length: int, concentration: float, seed: int):
    _check_concentration(concentration)
    rng = np.random.default_rng(seed)
    self.marginals = rng.dirichlet(np.full(vocab_size, concentration), size=length)
    self.cumulative = np.cumsum(self.marginals, axis=-1)

  def sequence_entropy(self, length: int) -> float:
    if length != len(self.marginals):
      raise ValueError(f"this source has {len(self.marginals)} positions, not {length}")
    return float(entropy_nats(self.marginals).sum())

  def known_source(self) -> data_lib.KnownSource:
    """Events: (position, its symbol)."""
    length = len(self.marginals)

    def events(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      x = np.asarray(x, np.int64)
      return np.broadcast_to(np.arange(length), x.shape), x

    def log_prob(x: np.ndarray) -> np.ndarray:
      with np.errstate(divide="ignore"):
        return np.log(self.marginals[np.arange(length), np.asarray(x, np.int64)]).sum(axis=1)

    return data_lib.KnownSource(log_prob, events, self.marginals, np.full(length, 1.0 / length))

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    u = rng.random((length, 1))
    symbols = (u > self.cumulative).sum(axis=-1)
    return np.minimum(symbols, self.marginals.shape[-1] - 1).astype(np.int32)


class Pairs:
  """Pairs of positions drawn jointly from one seeded table [V, V]."""

  def __init__(self, vocab_size: int, concentration: float, seed: int):
    _check_concentration(concentration)
    rng = np.random.default_rng(seed)
    self.vocab_size = vocab_size
    self.joint = rng.dirichlet(np.full(vocab_size**2, concentration))
    self.cumulative = np.cumsum(self.joint)

  def sequence_entropy(self, length: int) -> float:
    if length % 2:
      raise ValueError(f"the pairs source needs an even seq_len, got {length}")
    return length // 2 * float(entropy_nats(self.joint))

  def known_source(self) -> data_lib.KnownSource:
    """Events: (one context, the pair (x_2j, x_2j+1) as x_2j V + x_2j+1)."""

    def events(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      x = np.asarray(x, np.int64)
      pairs = x[:, 0::2] * self.vocab_size + x[:, 1::2]
      return np.zeros_like(pairs), pairs

    def log_prob(x: np.ndarray) -> np.ndarray:
      with np.errstate(divide="ignore"):
        return np.log(self.joint[events(x)[1]]).sum(axis=1)

    return data_lib.KnownSource(log_prob, events, self.joint[None], np.ones(1), 2)

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    pair = np.searchsorted(self.cumulative, rng.random(length // 2), side="right")
    pair = np.minimum(pair, self.vocab_size**2 - 1)
    pairs = np.stack([pair // self.vocab_size, pair % self.vocab_size], -1)
    return pairs.reshape(-1).astype(np.int32)


def make_process(config: ml_collections.ConfigDict):
  """The source process named by config.synthetic.kind."""
  options = config.synthetic
  kind = options.kind
  vocab_size = alphabet.VOCAB_SIZE
  if kind == "markov":
    return MarkovChain(vocab_size, options.order, options.concentration, options.source_seed)
  if kind == "factorised":
    return Factorised(vocab_size, config.seq_len, options.concentration, options.source_seed)
  if kind == "pairs":
    return Pairs(vocab_size, options.concentration, options.source_seed)
  raise ValueError(f"unknown synthetic.kind {kind!r}; valid: {KINDS}")


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

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([*self.seeds, self.split_id, int(index)])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"x": self.process.sample(self._rng(index), self.length)}

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `indices` [b] stacked: {"x": int32 [b, L]}, equal to reading them one by one."""
    rngs = [self._rng(index) for index in np.asarray(indices).tolist()]
    if isinstance(self.process, MarkovChain):
      return {"x": self.process.sample_batch(rngs, self.length)}
    return {"x": np.stack([self.process.sample(rng, self.length) for rng in rngs])}


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Sequences of config.seq_len symbols from the source named by config.synthetic.kind."""
  options = config.synthetic
  length = config.seq_len
  if length < 1:
    raise ValueError(f"seq_len must be >= 1, got {length}")
  if options.source_seed < 0 or config.seed < 0:
    raise ValueError(f"synthetic.source_seed ({options.source_seed}) and seed "
                     f"({config.seed}) must be >= 0")
  process = make_process(config)
  # Training draws depend on config.seed; the held-out split only on the source.
  train = SyntheticSplit(process, length, (options.source_seed, config.seed),
                         "train", _TRAIN_SIZE)
  held_out = SyntheticSplit(process, length, (options.source_seed,), "eval",
                            options.num_eval_examples)
  return data_lib.Dataset(
      train=pipeline.train_iterator(train, config.batch_size, config.seed, shuffle=False),
      eval_batches=pipeline.eval_iterator_fn(held_out, config.batch_size),
      vocab_size=alphabet.VOCAB_SIZE,
      example_shape=(length,),
      decode=alphabet.decode,
      encode=alphabet.encode_prompt,
      read_text=chars.read_ids,
      entropy_bits_per_token=process.sequence_entropy(length) / (length * math.log(2)),
      known_source=process.known_source(),
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, float]:
  """Nothing to prepare; reports the exact entropy."""
  del progress
  return {"entropy_bits_per_token": create(config).entropy_bits_per_token}


def shapes(config: ml_collections.ConfigDict) -> data_lib.Shapes:
  return data_lib.Shapes(alphabet.VOCAB_SIZE, (config.seq_len,))


SOURCE = data_lib.register(data_lib.Source("synthetic", OPTIONS, create, prepare, shapes))
