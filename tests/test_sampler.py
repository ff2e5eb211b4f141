"""Tests for md4.sampler with oracle networks of known output.

Statistical checks are chi-square tests at a false-alarm rate of ALPHA = 1e-3
per test function (Bonferroni over the positions tested), with fixed seeds so
every run gives the same verdict. Each statistical test also shows that the
same samples reject a wrong distribution, so it cannot pass vacuously.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import diffusion
from md4 import models
from md4 import sampler
from md4 import samplers
from md4 import schedule
from md4.samplers import engine
from tests.test_train import tiny_config

ALPHA = 1e-3
EPS = 1e-4  # the schedules' clamp


def factorised_oracle(log_p: np.ndarray):
  """predict_fn returning log p [L, V] at every step, ignoring z and t."""
  log_p = jnp.asarray(log_p, jnp.float32)

  def predict_fn(z, t):
    del t
    return jnp.broadcast_to(log_p, z.shape + log_p.shape[-1:])

  return predict_fn


def max_oracle(vocab_size: int):
  """predict_fn putting all mass on the largest unmasked id of the row.

  A row with nothing unmasked gets uniform logits. Ignores t.
  """

  def predict_fn(z, t):
    del t
    flat = z.reshape(z.shape[0], -1)
    largest = jnp.max(jnp.where(flat == vocab_size, -1, flat), axis=-1)
    largest = largest.reshape((-1,) + (1,) * (z.ndim - 1))
    hit = jnp.arange(vocab_size) == largest[..., None]
    return jnp.where(hit, 0.0, -1e9) * jnp.ones(z.shape + (1,))

  return predict_fn


def random_marginals(length: int, vocab_size: int, seed: int) -> np.ndarray:
  """p [L, V], every entry >= 0.1 / V so expected counts stay large."""
  p = np.random.default_rng(seed).dirichlet(np.full(vocab_size, 2.0), size=length)
  return 0.9 * p + 0.1 / vocab_size


def chi_square(samples: np.ndarray, p: np.ndarray) -> np.ndarray:
  """Pearson statistic per position [L] of samples [N, L] against p [L, V]."""
  num, vocab_size = samples.shape[0], p.shape[-1]
  counts = np.stack([np.bincount(column, minlength=vocab_size)
                     for column in samples.T])
  expected = num * p
  return np.sum((counts - expected)**2 / expected, axis=-1)


def chi_square_limit(num_tests: int, dof: int) -> float:
  """Rejection threshold for one of num_tests tests at ALPHA overall."""
  return float(stats.chi2.ppf(1.0 - ALPHA / num_tests, dof))


def assert_marginals(samples: np.ndarray, p: np.ndarray) -> None:
  """samples [N, L] match per-position marginals p [L, V]; a wrong p is rejected."""
  limit = chi_square_limit(p.shape[0], p.shape[-1] - 1)
  statistic = chi_square(samples, p)
  assert np.all(statistic < limit), (statistic, limit)
  wrong_p = np.roll(p, 1, axis=-1)
  assert np.any(chi_square(samples, wrong_p) > limit)


def ancestral(predict_fn, rng, *, vocab_size: int, schedule, **kwargs):
  """(z, nfe) of the ancestral sampler over MD4's tokens."""
  drawn = samplers.sample("ancestral", predict_fn, rng, diffusion.Tokens(vocab_size, schedule),
                          **kwargs)
  return drawn.tokens, drawn.nfe


def jit_sample(predict_fn, **kwargs):
  """The sampler jitted over rng, every other argument static: (z, nfe)."""
  return jax.jit(functools.partial(ancestral, predict_fn, **kwargs))


def sample_factorised(p: np.ndarray, rng, **kwargs):
  """Jitted sampler with the factorised oracle for marginals p [..., V].

  log p is a jit argument, as a network's parameters would be: a constant
  oracle would let XLA spend seconds constant-folding the sampler.
  """
  def run(rng, log_p):
    return ancestral(factorised_oracle(log_p), rng, **kwargs)[0]

  return jax.jit(run)(rng, jnp.log(jnp.asarray(p, jnp.float32)))


def test_time_grid_exact_values():
  np.testing.assert_allclose(sampler.time_grid(4, "uniform"),
                             [1.0, 0.75, 0.5, 0.25, 0.0])
  cosine = sampler.time_grid(4, "cosine")
  np.testing.assert_allclose(cosine, np.cos(np.pi / 8 * np.arange(5)), atol=1e-7)
  assert cosine[0] == 1.0 and cosine[-1] == 0.0
  assert np.all(np.diff(sampler.time_grid(1000, "cosine")) < 0)
  np.testing.assert_array_equal(sampler.time_grid(1, "cosine"), [1.0, 0.0])


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_reveal_step_distribution(grid):
  """A network whose answer is the step index records when each position was revealed.

  Starting fully masked at t_0 = 1, position i is revealed at step k < T - 1
  with probability (alpha(t_{k+1}) - alpha(t_k)) / (1 - alpha(t_0)); the last
  step reveals or fills the rest. Checked for the cosine schedule, with the
  grid and alpha written out here independently of the sampler.
  """
  steps, batch_size, length = 6, 2000, 8
  fraction = np.arange(steps + 1) / steps
  times = 1.0 - fraction if grid == "uniform" else np.cos(np.pi / 2 * fraction)
  times[-1] = 0.0
  alpha = (1 - 2 * EPS) * (1 - np.cos(np.pi / 2 * (1 - times))) + EPS
  expected = np.diff(alpha)[:-1] / (1 - alpha[0])
  expected = np.append(expected, (1 - alpha[-2]) / (1 - alpha[0]))
  assert abs(expected.sum() - 1.0) < 1e-9

  grid_times = jnp.asarray(times[:-1], jnp.float32)

  def step_index_oracle(z, t):
    step = jnp.argmin(jnp.abs(t[:, None] - grid_times[None, :]), axis=-1)
    hit = jnp.arange(steps) == step[:, None, None]
    return jnp.where(hit, 0.0, -1e9) * jnp.ones(z.shape + (1,))

  sample = jit_sample(step_index_oracle, shape=(batch_size, length),
                      vocab_size=steps, schedule=schedule.get("cosine"),
                      steps=steps, grid=grid)
  z = np.asarray(sample(jax.random.key(1))[0])
  pooled = z.reshape(-1, 1)
  limit = chi_square_limit(1, steps - 1)
  assert chi_square(pooled, expected[None])[0] < limit
  # The other grid's reveal times must be rejected.
  other = 1.0 - fraction if grid == "cosine" else np.cos(np.pi / 2 * fraction)
  other[-1] = 0.0
  alpha = (1 - 2 * EPS) * (1 - np.cos(np.pi / 2 * (1 - other))) + EPS
  wrong = np.append(np.diff(alpha)[:-1], 1 - alpha[-2]) / (1 - alpha[0])
  assert chi_square(pooled, wrong[None])[0] > limit


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_factorised_oracle_reproduces_marginals(grid):
  num, length, vocab_size = 4000, 8, 5
  p = random_marginals(length, vocab_size, seed=0)
  z = np.asarray(sample_factorised(
      p, jax.random.key(2), shape=(num, length), vocab_size=vocab_size,
      schedule=schedule.get("linear"), steps=32, grid=grid))
  assert z.dtype == np.int32 and z.shape == (num, length)
  assert z.min() >= 0 and z.max() < vocab_size
  assert_marginals(z, p)


def test_top_p_log_probs_exact():
  def nucleus(p, top_p):
    return np.exp(np.asarray(sampler.top_p_log_probs(jnp.log(jnp.asarray(p)), top_p)))

  p = np.array([0.4, 0.1, 0.3, 0.2])
  np.testing.assert_allclose(nucleus(p, 0.6), [4 / 7, 0, 3 / 7, 0], atol=1e-6)
  np.testing.assert_allclose(nucleus(p, 0.35), [1, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(nucleus(p, 0.8), [0.4 / 0.9, 0, 0.3 / 0.9, 0.2 / 0.9],
                             atol=1e-6)
  np.testing.assert_allclose(nucleus(p, 1.0), p, atol=1e-6)
  np.testing.assert_allclose(nucleus(p, None), p, atol=1e-6)
  # Ties: every value tied with the least likely kept one is kept as well.
  tied = np.array([0.3, 0.2, 0.3, 0.2])
  np.testing.assert_allclose(nucleus(tied, 0.5), [0.5, 0, 0.5, 0], atol=1e-6)
  np.testing.assert_allclose(nucleus(tied, 0.65), tied, atol=1e-6)
  np.testing.assert_allclose(nucleus(np.full(4, 0.25), 0.1), np.full(4, 0.25),
                             atol=1e-6)


def test_top_p_samples_renormalised_nucleus():
  top_p = 0.7
  p = np.array([[0.5, 0.25, 0.15, 0.06, 0.04],    # nucleus {0, 1}
                [0.05, 0.1, 0.2, 0.3, 0.35],      # nucleus {2, 3, 4}
                [0.2, 0.2, 0.2, 0.2, 0.2],        # all tied: everything
                [0.04, 0.8, 0.06, 0.05, 0.05]])   # nucleus {1}
  nucleus = np.array([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1],
                      [0, 1, 0, 0, 0]], bool)
  renormalised = np.where(nucleus, p, 0.0)
  renormalised /= renormalised.sum(-1, keepdims=True)
  num = 4000
  z = np.asarray(sample_factorised(
      p, jax.random.key(3), shape=(num, 4), vocab_size=5,
      schedule=schedule.get("cosine"), steps=16, top_p=top_p))
  assert np.all(nucleus[np.arange(4), z])
  # Chi-square on the nucleus only (outside it the counts are exactly 0).
  limit = chi_square_limit(3, 1)
  for position, dof in ((0, 1), (1, 2), (2, 4)):
    kept = np.flatnonzero(nucleus[position])
    counts = np.array([(z[:, position] == v).sum() for v in kept])
    expected = num * renormalised[position, kept]
    statistic = np.sum((counts - expected)**2 / expected)
    assert statistic < chi_square_limit(3, dof), (position, statistic)
  assert np.all(z[:, 3] == 1)
  # The un-renormalised p is rejected at position 0.
  assert chi_square(z[:, :1], p[:1])[0] > limit


def test_image_shape_no_mask_left():
  shape, vocab_size = (3, 4, 4, 3), 7
  p = random_marginals(48, vocab_size, seed=4).reshape(4, 4, 3, vocab_size)
  z, nfe = jax.jit(lambda rng: ancestral(
      factorised_oracle(np.log(p)), rng, shape=shape, vocab_size=vocab_size,
      schedule=schedule.get("poly2"), steps=5, grid="uniform"))(jax.random.key(5))
  assert z.shape == shape and z.dtype == jnp.int32
  assert int(z.min()) >= 0 and int(z.max()) < vocab_size
  assert int(nfe) == 5


def test_single_step_fills_everything():
  """With one step almost nothing is revealed, and argmax fills the rest."""
  p = random_marginals(8, 5, seed=6)
  # A raw uint32 key works as well as a typed one.
  z, nfe = ancestral(factorised_oracle(np.log(p)), jax.random.PRNGKey(7), shape=(64, 8),
                     vocab_size=5, schedule=schedule.get("linear"), steps=1)
  assert int(nfe) == 1
  assert np.all(np.asarray(z) < 5)
  # An empty prefix changes nothing.
  z_empty_prefix = sample_factorised(
      p, jax.random.PRNGKey(7), shape=(64, 8), vocab_size=5,
      schedule=schedule.get("linear"), steps=1,
      prefix=jnp.zeros((64, 0), jnp.int32))
  np.testing.assert_array_equal(z_empty_prefix, z)


@pytest.mark.parametrize("shape", [(4, 10), (4, 2, 3, 3)])
def test_prefix_given_unchanged_and_seen_by_network(shape):
  vocab_size = 9
  prefix = jnp.array([[3, 1, 2], [8, 0, 0], [0, 5, 7], [6, 6, 6]], jnp.int32)
  z = jit_sample(max_oracle(vocab_size), shape=shape, vocab_size=vocab_size,
                 schedule=schedule.get("linear"), steps=8,
                 prefix=prefix)(jax.random.key(8))[0]
  flat = np.asarray(z).reshape(4, -1)
  np.testing.assert_array_equal(flat[:, :3], prefix)
  # The network saw the prefix from the first step: the rest is its max.
  np.testing.assert_array_equal(flat[:, 3:], np.broadcast_to(
      np.max(np.asarray(prefix), axis=1, keepdims=True), flat[:, 3:].shape))


def test_infill_given_unchanged_and_seen_by_network():
  vocab_size, shape = 11, (6, 12)
  keys = jax.random.split(jax.random.key(9), 2)
  template = jax.random.randint(keys[0], shape, 0, vocab_size)
  given = jax.random.bernoulli(keys[1], 0.3, shape).at[:, 5].set(True)
  # Template values away from given positions are ignored, even the mask id.
  template = jnp.where(given, template, vocab_size)
  # Template and mask are jit arguments here (traced), unlike the prefix above.
  def run(rng, template, given):
    return sampler.ancestral(max_oracle(vocab_size), rng, shape=shape,
                             vocab_size=vocab_size,
                             schedule=schedule.get("cosine"), steps=10,
                             infill=(template, given))

  z = jax.jit(run)(jax.random.key(10), template, given)
  z, template, given = map(np.asarray, (z, template, given))
  np.testing.assert_array_equal(z[given], template[given])
  row_max = np.max(np.where(given, template, -1), axis=1, keepdims=True)
  np.testing.assert_array_equal(z[~given], np.broadcast_to(row_max, shape)[~given])


def test_prefix_wins_over_infill():
  template = jnp.full((2, 6), 4, jnp.int32)
  given = jnp.zeros((2, 6), bool).at[:, :2].set(True)
  prefix = jnp.array([[1], [2]], jnp.int32)
  z = sampler.ancestral(max_oracle(5), jax.random.key(11), shape=(2, 6),
                        vocab_size=5, schedule=schedule.get("linear"), steps=4,
                        prefix=prefix, infill=(template, given))
  np.testing.assert_array_equal(np.asarray(z)[:, :2], [[1, 4], [2, 4]])


def test_reuse_outputs_bounds_nfe_and_keeps_marginals():
  steps, length, vocab_size, num = 256, 16, 5, 2000
  p = random_marginals(length, vocab_size, seed=12)

  log_p = jnp.log(jnp.asarray(p, jnp.float32))

  def one_sequence(rng, log_p, reuse):
    return ancestral(factorised_oracle(log_p), rng, shape=(1, length), vocab_size=vocab_size,
                     schedule=schedule.get("linear"), steps=steps, reuse_outputs=reuse)

  rngs = jax.random.split(jax.random.key(13), num)
  # vmap turns the skip into a select, but NFE is still counted per sequence.
  z, nfe = jax.jit(jax.vmap(functools.partial(one_sequence, reuse=True),
                            in_axes=(0, None)))(rngs, log_p)
  nfe = np.asarray(nfe)
  assert nfe.max() <= min(steps, length)
  assert nfe.min() >= 1
  assert_marginals(np.asarray(z)[:, 0], p)
  _, nfe_plain = jax.jit(functools.partial(one_sequence, reuse=False))(rngs[0],
                                                                        log_p)
  assert int(nfe_plain) == steps


def test_reuse_outputs_skips_real_calls():
  """Host-side count of network calls that ran equals the reported NFE."""
  calls = []

  def counting_oracle(z, t):
    jax.debug.callback(lambda: calls.append(1))
    return max_oracle(6)(z, t)

  for batch_size in (1, 3):
    calls.clear()
    z, nfe = jit_sample(counting_oracle, shape=(batch_size, 8), vocab_size=6,
                        schedule=schedule.get("linear"), steps=64,
                        reuse_outputs=True)(jax.random.key(14))
    jax.block_until_ready(z)
    assert len(calls) == int(nfe)
    assert int(nfe) <= min(64, batch_size * 8)
  assert int(nfe) < 64


def test_reuse_outputs_gives_identical_samples():
  """For a t-independent network that reads z, reuse changes no sample."""
  vocab_size, length = 7, 12
  table = jax.random.normal(jax.random.key(15), (vocab_size + 1, vocab_size))

  def previous_token_oracle(z, t):
    del t
    previous = jnp.concatenate([z[:, -1:], z[:, :-1]], axis=1)
    return 3.0 * table[previous]

  outputs = {}
  for reuse in (False, True):
    outputs[reuse] = jit_sample(previous_token_oracle, shape=(32, length),
                                vocab_size=vocab_size,
                                schedule=schedule.get("cosine"), steps=100,
                                top_p=0.9, reuse_outputs=reuse)(jax.random.key(16))
  np.testing.assert_array_equal(outputs[False][0], outputs[True][0])
  assert int(outputs[False][1]) == 100
  assert int(outputs[True][1]) < 100


def test_reuse_outputs_refuses_a_network_that_reads_t():
  """Reusing a t-reading network's output would feed it stale times (1.3% of
  positions differed in a test before this was refused); a network that
  computes something from t and drops it is not reading it."""
  vocab_size = 4
  reads_t = lambda z, t: jnp.zeros(z.shape + (vocab_size,)) + t[:, None, None]

  def drops_t(z, t):
    del t
    return jnp.zeros(z.shape + (vocab_size,))

  def reads_and_drops_t(z, t):
    jnp.sin(t)
    return jnp.zeros(z.shape + (vocab_size,)) * jnp.float32(z.shape[0])

  kwargs = dict(shape=(2, 5), vocab_size=vocab_size, schedule=schedule.get("linear"),
                steps=4, reuse_outputs=True)
  with pytest.raises(ValueError, match="reuse_outputs: predict_fn reads t"):
    jax.jit(lambda rng: sampler.ancestral(reads_t, rng, **kwargs))(jax.random.key(0))
  for network in (drops_t, reads_and_drops_t):
    jax.jit(lambda rng: sampler.ancestral(network, rng, **kwargs))(jax.random.key(0))


def test_the_time_check_follows_nested_calls():
  """t through a jitted inner call counts only where it reaches the output."""
  inner = jax.jit(lambda a, t: (a * 2.0, t + 1.0))

  def through_jit(z, t):
    logits, _ = inner(jnp.zeros(z.shape + (3,)), t)
    return logits

  def reads_through_jit(z, t):
    logits, shifted = inner(jnp.zeros(z.shape + (3,)), t)
    return logits + shifted[:, None, None]

  z = jnp.zeros((2, 4), jnp.int32)
  engine.check_ignores_time(through_jit, z)
  with pytest.raises(ValueError, match="reads t"):
    engine.check_ignores_time(reads_through_jit, z)


@pytest.mark.parametrize("model_type", ["md4", "genmd4", "prime"])
def test_models_reuse_outputs_exactly_when_the_network_ignores_t(model_type):
  """Every model type reuses its network's output when time_conditioning is
  "none" (fewer NFE than steps, for 2 sequences of 16 tokens over 64 steps)
  and never otherwise."""
  nfe = {}
  for time_conditioning in ("none", "adaln"):
    config = tiny_config(model_type=model_type)
    config.model.time_conditioning = time_conditioning
    model = models.create(config, 27, (config.seq_len,))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
    draw = jax.jit(lambda params, rng: model.sample(params, rng, 2, steps=64, grid="cosine"))
    nfe[time_conditioning] = int(draw(params, jax.random.PRNGKey(1)).nfe)
  assert nfe["adaln"] == 64 and nfe["none"] < 64, nfe


def call_with(**overrides):
  kwargs = dict(rng=jax.random.key(0), shape=(2, 4), vocab_size=5,
                schedule=schedule.get("linear"), steps=4)
  kwargs.update(overrides)
  rng = kwargs.pop("rng")
  return sampler.ancestral(factorised_oracle(np.zeros((4, 5))), rng, **kwargs)


@pytest.mark.parametrize("overrides,name", [
    (dict(grid="linear"), "grid"),
    (dict(steps=0), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p="0.9"), "top_p"),
    (dict(schedule="linear"), "schedule"),
    (dict(shape=(4,)), "shape"),
    (dict(shape=(2, 0)), "shape"),
    (dict(rng=jnp.zeros(2, jnp.float32)), "rng"),
    (dict(prefix=jnp.zeros((2, 5), jnp.int32)), "prefix"),
    (dict(prefix=jnp.array([[1, 5]], jnp.int32).repeat(2, 0)), "prefix"),
    (dict(prefix=jnp.array([[1, -1]], jnp.int32).repeat(2, 0)), "prefix"),
    (dict(prefix=jnp.zeros((2, 2), jnp.float32)), "prefix"),
    (dict(prefix=jnp.zeros((3, 2), jnp.int32)), "prefix"),
    (dict(prefix=jnp.zeros((2,), jnp.int32)), "prefix"),
    (dict(infill=(jnp.zeros((2, 4), jnp.int32),
                  jnp.zeros((2, 4), jnp.int32))), "infill given"),
    (dict(infill=(jnp.zeros((2, 4), jnp.float32),
                  jnp.ones((2, 4), bool))), "infill template"),
    (dict(infill=(jnp.full((2, 4), 5, jnp.int32),
                  jnp.ones((2, 4), bool))), "infill template"),
    (dict(infill=(jnp.zeros((2, 3), jnp.int32),
                  jnp.ones((2, 3), bool))), "infill"),
    (dict(infill=jnp.zeros((2, 4), jnp.int32)), "infill"),
])
def test_bad_input_raises_value_error_naming_argument(overrides, name):
  with pytest.raises(ValueError, match=name):
    call_with(**overrides)


def test_wrong_logits_shape_names_predict_fn():
  with pytest.raises(ValueError, match="predict_fn"):
    sampler.ancestral(factorised_oracle(np.zeros((4, 6))), jax.random.key(0),
                      shape=(2, 4), vocab_size=5,
                      schedule=schedule.get("linear"), steps=2)
