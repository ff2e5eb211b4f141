"""md4.draws: uniforms and the categorical draw keep small probabilities.

Deterministic checks map bits to values exactly; the rate at which the
categorical draws a value of probability P is computed exactly from the
bits (no sampling), and one statistical test, at a false-alarm rate of 1e-3,
draws through `sampler.ancestral` in a regime where float32 Gumbel-max
(jax.random.categorical, the samplers' draw before md4.draws) under-draws
13-fold, and is run against that draw too, which it rejects.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import draws, genmd4, prime, sampler, samplers, schedule

FALSE_ALARM = 1e-3


def test_uniform_from_bits_has_relative_precision_down_to_two_to_minus_64():
  rng = np.random.default_rng(0)
  high = np.concatenate([[0] * 64, 2**rng.integers(0, 32, 4096)
                         + rng.integers(0, 2**20, 4096)]).astype(np.uint64) % 2**32
  low = rng.integers(0, 2**32, len(high), dtype=np.uint64)
  low[:8] = [0, 1, 2, 3, 2**24 - 1, 2**24 + 1, 2**31, 2**32 - 1]
  exact = (high.astype(np.float64) + (low.astype(np.float64) + 0.5) * 2.0**-32) * 2.0**-32
  u = np.asarray(draws.uniform_from_bits(jnp.asarray(high, jnp.uint32),
                                         jnp.asarray(low, jnp.uint32)), np.float64)
  np.testing.assert_allclose(u, np.minimum(exact, 1 - 2.0**-24), rtol=2.0**-23)
  assert u.min() == np.float32((0.5 * 2.0**-32) * 2.0**-32) > 0
  top = draws.uniform_from_bits(jnp.uint32(2**32 - 1), jnp.uint32(2**32 - 1))
  assert float(top) == 1 - 2.0**-24


def test_bernoulli_is_uniform_below_p():
  """bernoulli is `uniform` < p: never at p = 0, always at p = 1 (u < 1), and
  at p = 1/2 half of the time."""
  key = jax.random.PRNGKey(0)
  assert not draws.bernoulli(key, 0.0, (4096,)).any()
  assert draws.bernoulli(key, 1.0, (4096,)).all()
  flips = draws.bernoulli(key, jnp.asarray([[0.5], [0.0]]), (2, 4096))
  assert not flips[1].any()
  assert stats.binomtest(int(flips[0].sum()), 4096, 0.5).pvalue > FALSE_ALARM
  np.testing.assert_array_equal(flips[0], draws.uniform(key, (2, 4096))[0] < 0.5)


def test_exponential_from_bits_is_exact_where_it_is_small():
  bits = np.concatenate([np.arange(64), 2**np.arange(6, 32) - 1,
                         np.random.default_rng(1).integers(0, 2**32, 512)]).astype(np.uint64)
  u = (bits.astype(np.float64) + 0.5) * 2.0**-32
  expected = -np.log1p(-np.minimum(u, 1 - 2.0**-24))
  got = np.asarray(draws.exponential_from_bits(jnp.asarray(bits, jnp.uint32)), np.float64)
  # Below u = 1/2; above, E is large (its value unimportant) and u's rounding shows.
  small = bits < 2**31
  np.testing.assert_allclose(got[small], expected[small], rtol=3e-7)
  assert np.all(np.diff(got[:64]) > 0)
  assert np.all(got > 0) and np.all(got <= -math.log(2.0**-24))


def _exact_rare_rate(probability: float, num_grid: int = 2**14) -> float:
  """P(categorical picks value 1 of [1 - P, P]), exactly from the bits map.

  For each of num_grid equally likely words k0 of value 0 (midpoints of
  equal cells), bisection finds K(k0), the number of words k1 of value 1
  for which `categorical_from_bits` returns 1 (the win region is k1 < K, E
  being increasing in the word): the rate is the mean of K / 2^32.
  """
  logits = jnp.log(jnp.asarray([1 - probability, probability], jnp.float32))
  k0 = ((np.arange(num_grid) + 0.5) * 2.0**32 / num_grid).astype(np.uint64)
  low = np.zeros(num_grid, np.uint64)
  high = np.full(num_grid, 2**32, np.uint64)
  wins = jax.jit(lambda bits: draws.categorical_from_bits(bits, logits) == 1)
  for _ in range(33):
    middle = (low + high) // 2
    bits = np.stack([k0, np.minimum(middle, 2**32 - 1)], axis=-1).astype(np.uint32)
    win = np.asarray(wins(jnp.asarray(bits))) & (middle < 2**32)
    low, high = np.where(win, middle + 1, low), np.where(win, high, middle)
  return float(np.mean(low.astype(np.float64))) * 2.0**-32


@pytest.mark.parametrize("probability", [1e-9, 3e-9, 1e-7, 1e-4])
def test_a_rare_value_is_drawn_at_its_rate(probability):
  """Within 1% at 1e-9, and as the module docstring predicts: the rate times
  1 / (2x sinh(1 / 2x)), x = 2^32 P (0.2% under at 1e-9). float32 Gumbel-max
  draws 1e-9 at about 3e-50 of its rate."""
  rate = _exact_rare_rate(probability)
  x = probability * 2.0**32
  predicted = 1 / (2 * x * math.sinh(1 / (2 * x)))
  assert abs(rate / probability - 1) < 0.01, rate / probability
  assert abs(rate / probability - predicted) < 1e-3, (rate / probability, predicted)


def test_categorical_never_draws_minus_inf_and_ties_are_broken_by_noise():
  logits = jnp.asarray([[0.0, -jnp.inf, 0.0, -jnp.inf]], jnp.float32)
  values = jax.jit(jax.vmap(lambda key: draws.categorical(key, logits)))(
      jax.random.split(jax.random.PRNGKey(2), 4000))[:, 0]
  assert set(np.unique(values)) == {0, 2}
  count = int((values == 0).sum())
  assert stats.binomtest(count, 4000, 0.5).pvalue > FALSE_ALARM


# Rare values: V = 2^14, value 0 dominant, every other of probability 3e-8.
# jax.random.categorical's noise resolves no E below 2^-23, so it draws them
# at x / (e^x - 1) = 0.076 of their rate (x = 2^-23 / 3e-8).
RARE_VOCAB, RARE_PROBABILITY = 2**14, 3e-8


def _rare_log_probs() -> np.ndarray:
  log_p = np.full(RARE_VOCAB, math.log(RARE_PROBABILITY))
  log_p[0] = math.log1p(-(RARE_VOCAB - 1) * RARE_PROBABILITY)
  return log_p


def _rare_count(monkeypatch, categorical) -> int:
  """The rare values among 2^15 positions that one sampler step at eps = 0
  reveals, every one a draw from the network's p, with `draws.categorical`
  replaced by categorical."""
  monkeypatch.setattr(draws, "categorical", categorical)
  positions_per_call, num_calls = 2048, 16

  @jax.jit
  def num_rare(rng, log_p):
    oracle = lambda z, t: jnp.broadcast_to(log_p, z.shape + log_p.shape)
    z = sampler.ancestral(oracle, rng, shape=(1, positions_per_call),
                          vocab_size=RARE_VOCAB, schedule=schedule.get("linear", eps=0.0),
                          steps=1)
    return (z != 0).sum()

  log_p = jnp.asarray(_rare_log_probs(), jnp.float32)
  return sum(int(num_rare(key, log_p))
             for key in jax.random.split(jax.random.key(3), num_calls))


def _float32_gumbel_max(rng, logits):
  """The samplers' draw before md4.draws."""
  return jax.random.categorical(rng, logits, axis=-1)


@pytest.mark.parametrize("categorical, drawn_at_its_rate",
                         [(draws.categorical, True), (_float32_gumbel_max, False)],
                         ids=["draws.categorical", "float32_gumbel_max"])
def test_the_sampler_draws_rare_values_at_their_rate(monkeypatch, categorical,
                                                     drawn_at_its_rate):
  """2^15 draws of 2^14 values: the count of rare ones is binomial with mean
  16.1 if they are drawn at their rate (1.2 for float32 Gumbel-max). The
  two-sided binomial test of that mean has false-alarm rate 1e-3; it passes
  for md4.draws and rejects the float32 draw the samplers used before it
  (its count here: 1), which is the test's power shown on this seed."""
  count = _rare_count(monkeypatch, categorical)
  num, rare_mass = 2**15, (RARE_VOCAB - 1) * RARE_PROBABILITY
  pvalue = stats.binomtest(count, num, rare_mass).pvalue
  assert (pvalue > FALSE_ALARM) == drawn_at_its_rate, (count, pvalue)
  if drawn_at_its_rate:
    # The same count rejects float32 Gumbel-max's rate.
    assert stats.binomtest(count, num, 0.076 * rare_mass).pvalue < FALSE_ALARM, count


@pytest.fixture
def recorded_draws(monkeypatch):
  """Calls of draws.categorical, recorded as the logits' shapes."""
  shapes = []
  categorical = draws.categorical

  def recording(rng, logits):
    shapes.append(logits.shape)
    return categorical(rng, logits)

  monkeypatch.setattr(draws, "categorical", recording)
  return shapes


def test_every_sampler_draws_its_values_with_draws_categorical(recorded_draws):
  """MD4 (full and top-p), GenMD4 and Prime all take their values from the
  one categorical tested above."""
  vocab_size, shape, sch = 5, (2, 3), schedule.get("linear")
  network = lambda z, t: jnp.zeros(z.shape + (vocab_size,))
  run = jax.jit
  run(lambda key: sampler.ancestral(network, key, shape=shape, vocab_size=vocab_size,
                                    schedule=sch, steps=2))(jax.random.key(0))
  run(lambda key: sampler.ancestral(network, key, shape=shape, vocab_size=vocab_size,
                                    schedule=sch, steps=2, top_p=0.9))(jax.random.key(0))
  run(lambda key: samplers.sample(
      "ancestral", network, key, genmd4.ValueTokens(vocab_size, jnp.ones(vocab_size), sch),
      shape=shape, steps=2))(jax.random.key(0))
  codec = prime.Codec(vocab_size, 2)
  run(lambda key: prime.sample(
      lambda y, t: jnp.zeros(y.shape[:-1] + (vocab_size,)), key, shape=shape, codec=codec,
      schedule=sch, steps=2))(jax.random.key(0))
  assert recorded_draws == [shape + (vocab_size,)] * 4
