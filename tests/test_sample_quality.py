"""Tests for md4.sample_quality: exact scores of samples against a known source.

The source's own samples must score the source's values within 3 standard
errors (fixed seeds; a false alarm would be 0.3% per score), and over 200
repeats without bias and with standard errors that cover; samples of the
source at temperature 0.5 (p^2 renormalised) must move each score the
predicted way, to the value computed exactly for the tempered source, within
3 standard errors, and far from the untempered value.
"""

import math

import numpy as np
import pytest

from md4 import data as data_lib
from md4 import sample_quality
from md4.data import synthetic
from tests.test_train import tiny_config

BITS = 1.0 / math.log(2.0)


def dataset_of(kind: str, order: int = 1, seq_len: int = 32, num: int = 1024):
  config = tiny_config()
  config.synthetic.kind = kind
  config.synthetic.order = order
  config.synthetic.num_eval_examples = num
  config.seq_len = seq_len
  config.batch_size = num
  return data_lib.create(config)


def assert_within(scores: dict, name: str, expected: float, num_se: float = 3.0) -> None:
  value, stderr = scores[name], scores[name + "_stderr"]
  assert abs(value - expected) < num_se * stderr, (name, value, expected, stderr)


@pytest.mark.parametrize("kind,order", [("markov", 1), ("markov", 2), ("factorised", 1),
                                        ("pairs", 1)])
def test_the_sources_own_samples_score_the_sources_values(kind, order):
  dataset = dataset_of(kind, order)
  tokens = next(dataset.eval_batches())["x"]
  scores = sample_quality.scores(tokens, dataset)
  for name in ("log_likelihood", "entropy_rate", "kl"):
    assert_within(scores, name, scores["source_" + name])
  assert scores["source_kl"] == 0.0
  assert scores["source_log_likelihood"] == -dataset.entropy_bits_per_token
  # log_prob is exact: the mean over many sequences is minus the entropy.
  assert scores["log_likelihood_stderr"] < 0.02


def test_known_source_log_prob_is_exact_on_a_two_state_chain():
  """A hand-made order-1 chain: log p of one sequence from the tables."""
  chain = synthetic.MarkovChain(2, 1, 1.0, 0)
  chain.transitions = np.array([[0.9, 0.1], [0.4, 0.6]])
  chain.stationary = np.array([0.8, 0.2])
  source = chain.known_source()
  x = np.array([[0, 0, 1, 1, 0]])
  expected = math.log(0.8) + math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.4)
  np.testing.assert_allclose(source.log_prob(x), [expected], rtol=1e-12)
  contexts, symbols = source.events(x)
  np.testing.assert_array_equal(contexts, [[0, 0, 1, 1]])
  np.testing.assert_array_equal(symbols, [[0, 1, 1, 0]])


def stationary(transitions: np.ndarray) -> np.ndarray:
  """The left eigenvector of eigenvalue 1, normalised (independent of md4's power iteration)."""
  values, vectors = np.linalg.eig(transitions.T)
  pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
  return pi / pi.sum()


def sample_chain(transitions: np.ndarray, start: np.ndarray, num: int, length: int,
                 seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  cumulative = np.cumsum(transitions, axis=1)
  x = np.empty((num, length), np.int64)
  x[:, 0] = np.minimum(np.searchsorted(np.cumsum(start), rng.random(num)), len(start) - 1)
  for position in range(1, length):
    u = rng.random((num, 1))
    x[:, position] = np.minimum((cumulative[x[:, position - 1]] <= u).sum(axis=1),
                                transitions.shape[1] - 1)
  return x


def test_the_source_at_temperature_half_moves_each_score_by_the_exact_amount():
  """Order-1 chain P, samples from Q ∝ P^2 row-wise, started from Q's stationary
  law pi_Q. Exactly, per token: log-likelihood
  [sum pi_Q log pi_P + (L - 1) sum_s pi_Q(s) sum_a Q log P] / L, entropy rate
  sum pi_Q H(Q_s), KL sum pi_Q KL(Q_s || P_s)."""
  length, num = 32, 2048
  dataset = dataset_of("markov", 1, seq_len=length)
  source = dataset.known_source
  p = source.table
  q = p**2 / np.sum(p**2, axis=1, keepdims=True)
  pi_p, pi_q = stationary(p), stationary(q)
  tokens = sample_chain(q, pi_q, num, length, seed=1)
  scores = sample_quality.scores(tokens, dataset)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_p = np.log(p)
    q_log_q = np.where(q > 0, q * np.log(q), 0.0)
  expected = {
      "log_likelihood": (pi_q @ np.log(pi_p) + (length - 1) * pi_q @ np.sum(q * log_p, axis=1))
                        / length * BITS,
      "entropy_rate": -pi_q @ q_log_q.sum(axis=1) * BITS,
      "kl": pi_q @ np.sum(q_log_q - q * log_p, axis=1) * BITS,
  }
  for name, value in expected.items():
    assert_within(scores, name, value)
  # The right way, and far: more likely, less random, away from the source.
  assert scores["log_likelihood"] - scores["source_log_likelihood"] > 0.1
  assert scores["source_entropy_rate"] - scores["entropy_rate"] > 0.1
  assert scores["kl"] > 10 * scores["kl_stderr"]


def test_bias_correction_exact_on_counts():
  """Row [1/2, 1/2] seen twice: the plug-in is ln 2 with chance 1/2, else 0; row
  [1/4, 3/4] seen once: always 0. Each row's estimate adds H(p_s) minus that mean."""
  table = np.array([[0.5, 0.5], [0.25, 0.75]])
  np.testing.assert_allclose(sample_quality.expected_plug_in_entropy(table, np.array([2, 1])),
                             [0.5 * math.log(2), 0.0], atol=1e-15)
  counts = np.array([[1.0, 1.0], [0.0, 1.0]])
  entropy_2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  expected = (2 * (math.log(2) + math.log(2) - 0.5 * math.log(2)) + entropy_2) / 3
  assert sample_quality.entropy_rate_nats(counts, table) == pytest.approx(expected, rel=1e-12)


def test_multinomial_rows_have_the_rows_totals_and_means():
  table = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
  draws = sample_quality.multinomial_rows(np.random.default_rng(0), np.array([50, 7]), table,
                                          4000)
  np.testing.assert_array_equal(draws.sum(axis=-1), np.broadcast_to([50, 7], (4000, 2)))
  np.testing.assert_allclose(draws.mean(axis=0), [[10, 15, 25], [0, 7, 0]], atol=0.3)


@pytest.mark.parametrize("order,concentration", [
    (1, 0.1), (1, 1.0),
    pytest.param(2, 0.1, marks=pytest.mark.slow), pytest.param(2, 1.0, marks=pytest.mark.slow)])
def test_the_sources_own_samples_score_it_without_bias_and_with_true_errors(order,
                                                                            concentration):
  """200 seeded repeats of 256 x 64 samples of a 27-symbol chain (the rows of
  benchmarks/sample_scores.py): the entropy rate and the KL (truth 0) have |bias| <
  spread / 3 and +-1.96 SE intervals covering the truth 88-99% of the time."""
  num_repeats, num, length = 200, 256, 64
  chain = synthetic.MarkovChain(27, order, concentration, 0)
  source = chain.known_source()
  rngs = [np.random.default_rng((num, repeat, row)) for repeat in range(num_repeats)
          for row in range(num)]
  tokens = chain.sample_batch(rngs, length).reshape(num_repeats, num, length)
  results = [sample_quality.known_source_scores(tokens[repeat], source, 0.0, seed=repeat)
             for repeat in range(num_repeats)]
  truths = {"entropy_rate": chain.entropy_rate() * BITS, "kl": 0.0}
  for name, truth in truths.items():
    values = np.array([result[name] for result in results])
    stderrs = np.array([result[name + "_stderr"] for result in results])
    assert abs(values.mean() - truth) < values.std(ddof=1) / 3, (name, values.mean(), truth)
    coverage = np.mean(np.abs(values - truth) < 1.96 * stderrs)
    assert 0.88 <= coverage <= 0.99, (name, coverage)


def test_unigram_entropy_matches_the_definition():
  tokens = np.array([[0, 0, 1, 2], [3, 3, 3, 3]])
  expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  np.testing.assert_allclose(sample_quality.unigram_entropy(tokens), [expected, 0.0])


def test_describe_names_each_score_and_its_distance_in_standard_errors():
  dataset = dataset_of("markov", 1, num=256)
  line = sample_quality.describe(sample_quality.scores(next(dataset.eval_batches())["x"],
                                                       dataset))
  for part in ("log-likelihood", "entropy rate", "transition KL", "SE)", "sample entropy"):
    assert part in line
