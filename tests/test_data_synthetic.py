"""Sources of known entropy: exact entropies against enumeration and Monte Carlo.

Statistical checks compare a seeded Monte-Carlo mean with the exact value at
4 standard errors (two-sided false-alarm rate 6e-5 under the normal
approximation); each also checks that a wrong answer would fail.
"""

import itertools
import math

import ml_collections
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import defaults
from md4.data import alphabet
from md4.data import synthetic
from tests import helpers


def _config(seq_len=16, batch_size=8, seed=0, **options) -> ml_collections.ConfigDict:
  return helpers.data_config("synthetic", seq_len=seq_len, batch_size=batch_size, seed=seed,
                             **options)


def _markov_log_prob(chain: synthetic.MarkovChain, x: np.ndarray) -> float:
  """log p(x) of one sequence started from the stationary k-gram distribution."""
  vocab_size, order = chain.vocab_size, chain.order
  state = 0
  for symbol in x[:order]:
    state = state * vocab_size + int(symbol)
  log_prob = math.log(chain.stationary[state])
  for symbol in x[order:]:
    log_prob += math.log(chain.transitions[state, symbol])
    state = (state % vocab_size**(order - 1)) * vocab_size + int(symbol)
  return log_prob


@pytest.mark.parametrize("order", [1, 2])
def test_markov_sequence_entropy_equals_enumeration(order):
  chain = synthetic.MarkovChain(vocab_size=3, order=order, concentration=0.7, seed=1)
  length = 5
  probs = np.array([math.exp(_markov_log_prob(chain, np.array(x)))
                    for x in itertools.product(range(3), repeat=length)])
  assert probs.sum() == pytest.approx(1.0, abs=1e-12)
  assert chain.sequence_entropy(length) == pytest.approx(
      float(synthetic.entropy_nats(probs)), abs=1e-10)


def test_stationary_distribution_is_invariant():
  chain = synthetic.MarkovChain(alphabet.VOCAB_SIZE, order=2, concentration=0.1, seed=0)
  moved = np.zeros_like(chain.stationary)
  states = np.arange(len(chain.stationary))
  for symbol in range(chain.vocab_size):
    np.add.at(moved, chain._next_state(states, symbol),  # pylint: disable=protected-access
              chain.stationary * chain.transitions[:, symbol])
  np.testing.assert_allclose(moved, chain.stationary, atol=1e-14)
  assert chain.stationary.sum() == pytest.approx(1.0, abs=1e-12)


def test_stationary_distribution_of_a_periodic_chain():
  chain = synthetic.MarkovChain(vocab_size=3, order=1, concentration=1.0, seed=0)
  # Period 2: 0 -> {1, 2} -> 0. Plain power iteration from uniform oscillates forever.
  chain.transitions = np.array([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(chain._stationary_states(),  # pylint: disable=protected-access
                             [0.5, 0.125, 0.375], atol=1e-12)


def test_markov_entropy_matches_monte_carlo_over_the_pipeline():
  length, num_sequences = 64, 4000
  chain = synthetic.MarkovChain(alphabet.VOCAB_SIZE, order=2, concentration=0.1, seed=3)
  split = synthetic.SyntheticSplit(chain, length, (3, 0), "train", num_sequences)
  neg_log_probs = np.array([-_markov_log_prob(chain, split[i]["x"])
                            for i in range(num_sequences)])
  mean = neg_log_probs.mean()
  standard_error = neg_log_probs.std(ddof=1) / math.sqrt(num_sequences)
  exact = chain.sequence_entropy(length)
  assert abs(mean - exact) < 4 * standard_error
  # Power: the entropy of a chain with another seed is many standard errors away.
  other = synthetic.MarkovChain(alphabet.VOCAB_SIZE, order=2, concentration=0.1, seed=4)
  assert abs(mean - other.sequence_entropy(length)) > 4 * standard_error


def test_markov_entropy_rate_matches_a_long_sample():
  chain = synthetic.MarkovChain(alphabet.VOCAB_SIZE, order=1, concentration=0.1, seed=5)
  x = chain.sample(np.random.default_rng(0), 400_000)
  per_symbol = -np.log(chain.transitions[x[:-1], x[1:]])
  # Batch means: 200 blocks of 2000 transitions are close to independent.
  block_means = per_symbol[:len(per_symbol) // 200 * 200].reshape(200, -1).mean(axis=1)
  standard_error = block_means.std(ddof=1) / math.sqrt(200)
  assert abs(block_means.mean() - chain.entropy_rate()) < 4 * standard_error
  assert abs(block_means.mean() - 0.98 * chain.entropy_rate()) > 4 * standard_error


def test_factorised_and_pairs_entropies_equal_enumeration():
  factorised = synthetic.Factorised(vocab_size=3, length=3, concentration=0.5, seed=0)
  probs = [np.prod([factorised.marginals[i, v] for i, v in enumerate(x)])
           for x in itertools.product(range(3), repeat=3)]
  assert factorised.sequence_entropy(3) == pytest.approx(
      float(synthetic.entropy_nats(np.array(probs))), abs=1e-12)
  pairs = synthetic.Pairs(vocab_size=3, concentration=0.5, seed=0)
  joint = pairs.joint.reshape(3, 3)
  probs = [joint[a, b] * joint[c, d] for a, b, c, d in itertools.product(range(3), repeat=4)]
  assert pairs.sequence_entropy(4) == pytest.approx(
      float(synthetic.entropy_nats(np.array(probs))), abs=1e-12)


@pytest.mark.parametrize("kind", ["factorised", "pairs"])
def test_factorised_and_pairs_sample_their_distribution(kind):
  length, num_sequences = 8, 4000
  config = _config(seq_len=length, kind=kind, concentration=0.3, source_seed=2)
  process = synthetic.make_process(config)
  split = synthetic.SyntheticSplit(process, length, (2, 0), "train", num_sequences)
  x = np.stack([split[i]["x"] for i in range(num_sequences)])
  if kind == "factorised":
    neg_log_probs = -np.log(process.marginals[np.arange(length), x]).sum(axis=1)
  else:
    pair_ids = x[:, 0::2] * alphabet.VOCAB_SIZE + x[:, 1::2]
    neg_log_probs = -np.log(process.joint[pair_ids]).sum(axis=1)
  standard_error = neg_log_probs.std(ddof=1) / math.sqrt(num_sequences)
  assert abs(neg_log_probs.mean() - process.sequence_entropy(length)) < 4 * standard_error


def test_dataset_reports_the_exact_entropy_and_is_deterministic():
  dataset = data_lib.create(_config(seq_len=16, order=2, concentration=0.2, source_seed=1,
                                    num_eval_examples=32))
  chain = synthetic.MarkovChain(alphabet.VOCAB_SIZE, 2, 0.2, 1)
  assert dataset.entropy_bits_per_token == pytest.approx(
      chain.sequence_entropy(16) / (16 * math.log(2)), rel=1e-12)
  assert (dataset.vocab_size, dataset.example_shape) == (27, (16,))
  batch = next(dataset.train)["x"]
  assert batch.shape == (8, 16) and batch.dtype == np.int32
  again = data_lib.create(_config(seq_len=16, order=2, concentration=0.2, source_seed=1,
                                  num_eval_examples=32))
  np.testing.assert_array_equal(next(again.train)["x"], batch)
  other_seed = data_lib.create(_config(seq_len=16, seed=1, order=2, concentration=0.2,
                                       source_seed=1, num_eval_examples=32))
  assert not np.array_equal(next(other_seed.train)["x"], batch)
  # The held-out split depends on the source only, not on the training seed.
  eval_a = np.concatenate([b["x"] for b in dataset.eval_batches()])
  eval_b = np.concatenate([b["x"] for b in other_seed.eval_batches()])
  np.testing.assert_array_equal(eval_a, eval_b)
  assert eval_a.shape == (32, 16)


def test_defaults_build_the_quick_start_source():
  dataset = data_lib.create(_config(seq_len=32))
  assert 0 < dataset.entropy_bits_per_token < math.log2(27)
  assert defaults.get_config().synthetic.to_dict() == synthetic.OPTIONS


@pytest.mark.parametrize("data, message", [
    ({"kind": "zipf"}, "unknown synthetic.kind 'zipf'"),
    ({"order": 0}, "synthetic.order must be >= 1"),
    ({"order": 5}, "lower synthetic.order"),
    ({"concentration": 0.0}, "synthetic.concentration must be > 0"),
    ({"kind": "pairs", "concentration": -1.0}, "synthetic.concentration must be > 0"),
    ({"source_seed": -1}, "synthetic.source_seed"),
    ({"order": 3, "seq_len": 2}, "shorter than the Markov order"),
    ({"kind": "pairs", "seq_len": 7}, "even seq_len"),
    ({"path": "x.txt"}, "unknown config key 'synthetic.path'"),
])
def test_invalid_options_are_rejected(data, message):
  seq_len = data.pop("seq_len", 16)
  with pytest.raises(ValueError, match=message):
    data_lib.create(_config(seq_len=seq_len, **data))


@pytest.mark.parametrize("kind, order", [("markov", 1), ("markov", 2), ("factorised", 1),
                                         ("pairs", 1)])
def test_batched_reads_equal_reading_examples_one_by_one(kind, order):
  config = _config(seq_len=12, kind=kind, order=order, concentration=0.2, source_seed=4)
  split = synthetic.SyntheticSplit(synthetic.make_process(config), 12, (4, 0), "train", 1000)
  indices = np.array([5, 999, 0, 5, 17])
  np.testing.assert_array_equal(split.get_batch(indices)["x"],
                                np.stack([split[i]["x"] for i in indices]))
