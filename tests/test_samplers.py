"""Tests for the samplers beyond ancestral (md4.sampler, md4.prime, md4.models).

Statistical checks are chi-square tests at a false-alarm rate of ALPHA = 1e-3
per test function, with fixed seeds; each also shows that the same samples
reject a wrong law, so that it cannot pass vacuously.
"""

import io
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import diffusion
from md4 import models
from md4 import prime
from md4.runtime import progress
from md4 import sampler
from md4 import samplers
from md4 import schedule
from md4.samplers import ordered
from md4.samplers import remdm
from tests.test_sampler import assert_marginals
from tests.test_sampler import factorised_oracle
from tests.test_sampler import random_marginals
from tests.test_train import tiny_config

ALPHA = 1e-3
LINEAR = schedule.get("linear")


class Terminal(io.StringIO):
  """A file that says it is a terminal, so that progress bars on it are shown."""

  def isatty(self) -> bool:
    return True


def draw_tokens(name: str, predict_fn, rng, *, vocab_size: int, schedule, steps: int = 1,
                **kwargs):
  """(z, nfe) of sampler `name` over MD4's tokens."""
  drawn = samplers.sample(name, predict_fn, rng, diffusion.Tokens(vocab_size, schedule),
                          steps=steps, **kwargs)
  return drawn.tokens, drawn.nfe


def md4_sampler(name: str, **options):
  """(predict_fn, rng, shape, vocab_size, **common) -> (z, nfe) for sampler `name`."""

  def draw(predict_fn, rng, **kwargs):
    return draw_tokens(name, predict_fn, rng, **kwargs, **options)

  return draw


SAMPLERS = {
    "maskgit": md4_sampler("maskgit"),
    "llada": md4_sampler("llada"),
    "llada_threshold": md4_sampler("llada", threshold=0.3),
    "blocks": md4_sampler("blocks", block_size=4),
    "remdm_cap": md4_sampler("remdm", strategy="cap", eta=0.2),
    "remdm_loop": md4_sampler("remdm", strategy="loop", eta=0.05),
    "first_hitting": md4_sampler("first_hitting"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_md4_samplers_keep_prefix_and_infill_leave_no_mask_and_count_nfe(name):
  batch, length, vocab_size, steps = 3, 12, 5, 6
  p = random_marginals(length, vocab_size, seed=1)
  given = np.zeros((batch, length), bool)
  given[:, [5, 9]] = True
  template = np.full((batch, length), 4, np.int32)
  prefix = jnp.ones((batch, 2), jnp.int32)

  def run(rng, log_p):
    return SAMPLERS[name](factorised_oracle(log_p), rng, shape=(batch, length),
                          vocab_size=vocab_size, schedule=LINEAR, steps=steps, prefix=prefix,
                          infill=(jnp.asarray(template), jnp.asarray(given)))

  z, nfe = jax.jit(run)(jax.random.key(0), jnp.log(jnp.asarray(p, jnp.float32)))
  z = np.asarray(z)
  assert z.min() >= 0 and z.max() < vocab_size
  assert np.all(z[:, :2] == 1) and np.all(z[:, [5, 9]] == 4)
  if name == "first_hitting":
    assert int(nfe) == length - 4  # One call per generated position.
  elif name == "llada_threshold":
    assert 1 <= int(nfe) <= steps
  else:
    assert int(nfe) == steps


def joint_oracle(joint: np.ndarray, mask_id: int):
  """predict_fn giving each position's exact conditional under joint [V]*L given z's unmasked values."""
  length, vocab_size = joint.ndim, joint.shape[0]
  sequences = jnp.asarray(list(itertools.product(range(vocab_size), repeat=length)), jnp.int32)
  weights = jnp.asarray(joint.reshape(-1), jnp.float32)

  def predict_fn(z, t):
    del t
    agrees = jnp.all((z[:, None, :] == mask_id) | (z[:, None, :] == sequences[None]), axis=-1)
    w = jnp.where(agrees, weights[None], 0.0)  # [B, S]
    marginals = jnp.einsum("bs,slv->blv", w, jax.nn.one_hot(sequences, vocab_size))
    return jnp.log(marginals / jnp.sum(w, axis=-1)[:, None, None])

  return predict_fn


def assert_joint_law(samples: np.ndarray, joint: np.ndarray, wrong: np.ndarray) -> None:
  """samples [N, L] pass a chi-square test against joint [V]*L and reject `wrong`."""
  vocab_size = joint.shape[0]
  cells = np.ravel_multi_index(samples.T, joint.shape)
  counts = np.bincount(cells, minlength=joint.size)
  limit = stats.chi2.ppf(1.0 - ALPHA, joint.size - 1)

  def statistic(law):
    expected = len(samples) * law.reshape(-1)
    return np.sum((counts - expected)**2 / expected)

  assert statistic(joint) < limit, (statistic(joint), limit)
  assert statistic(wrong) > limit, vocab_size


def product_of_marginals(joint: np.ndarray) -> np.ndarray:
  marginals = [joint.sum(axis=tuple(a for a in range(joint.ndim) if a != i))
               for i in range(joint.ndim)]
  return np.einsum("i,j,k->ijk", *marginals)


def test_first_hitting_draws_the_joint_law_of_a_time_independent_oracle():
  """An oracle of the exact conditionals of a joint over 3 positions x 3 values:
  first-hitting reproduces the joint (27 cells, chi-square at ALPHA); one
  ancestral step, which draws positions independently, gives the product of
  marginals, which these samples reject."""
  joint = np.random.default_rng(2).dirichlet(np.full(27, 0.5)).reshape(3, 3, 3)
  joint = 0.9 * joint + 0.1 / 27
  num = 20000
  oracle = joint_oracle(joint, mask_id=3)
  z, nfe = jax.jit(lambda rng: draw_tokens(
      "first_hitting", oracle, rng, shape=(num, 3), vocab_size=3,
      schedule=schedule.get("cosine")))(jax.random.key(3))
  assert int(nfe) == 3
  assert_joint_law(np.asarray(z), joint, product_of_marginals(joint))
  one_step = jax.jit(lambda rng: sampler.ancestral(
      oracle, rng, shape=(num, 3), vocab_size=3, schedule=LINEAR, steps=1))(jax.random.key(4))
  assert_joint_law(np.asarray(one_step), product_of_marginals(joint), joint)


def prime_joint_oracle(joint: np.ndarray, codec: prime.Codec):
  """predict_fn of each position's exact token conditional under joint [C, C] given y's digits."""
  table = jnp.asarray(codec.digit_table)  # [C, l]
  num_classes = codec.num_classes
  pairs = jnp.asarray(list(itertools.product(range(num_classes), repeat=2)), jnp.int32)
  weights = jnp.asarray(joint.reshape(-1), jnp.float32)

  def predict_fn(y, t):
    del t
    codes = table[pairs]  # [S, 2, l]
    agrees = jnp.all((y[:, None] == codec.mask_id) | (y[:, None] == codes[None]), axis=(-1, -2))
    w = jnp.where(agrees, weights[None], 0.0)
    marginals = jnp.einsum("bs,slc->blc", w, jax.nn.one_hot(pairs, num_classes))
    return jnp.log(marginals / jnp.sum(w, axis=-1)[:, None, None])

  return predict_fn


def test_prime_first_hitting_draws_the_joint_law_of_a_time_independent_oracle():
  """Prime's first-hitting over sub-tokens (C = 4 as 2 binary digits, L = 2):
  the joint of the two tokens (16 cells) at ALPHA, one call per sub-token."""
  codec = prime.Codec(4, 2)
  joint = 0.8 * np.random.default_rng(5).dirichlet(np.full(16, 0.5)) + 0.2 / 16
  joint = joint.reshape(4, 4)
  num = 20000
  tokens, nfe, _ = jax.jit(lambda rng: samplers.sample(
      "first_hitting", prime_joint_oracle(joint, codec), rng, prime.SubTokens(codec, LINEAR),
      shape=(num, 2), steps=1))(jax.random.key(6))
  assert int(nfe) == 4
  wrong = np.outer(joint.sum(1), joint.sum(0))
  assert_joint_law(np.asarray(tokens), joint, wrong)


def test_prime_ordered_and_first_hitting_keep_prefix_and_count_nfe():
  codec = prime.Codec(5, 2)
  p = random_marginals(8, 5, seed=7)
  log_p = jnp.log(jnp.asarray(p, jnp.float32))

  def oracle(y, t):
    del t
    return jnp.broadcast_to(log_p, y.shape[:-1] + (5,))

  prefix = jnp.full((2, 3), 4, jnp.int32)
  space = prime.SubTokens(codec, LINEAR)
  tokens, nfe, _ = jax.jit(lambda rng: samplers.sample(
      "blocks", oracle, rng, space, shape=(2, 8), steps=4, order="maskgit",
      block_size=4, prefix=prefix))(jax.random.key(8))
  # Block 0 has one free position: revealed at its first step, it leaves 2 + 1 steps.
  assert int(nfe) == 3 and np.all(np.asarray(tokens)[:, :3] == 4)
  assert np.asarray(tokens).max() < 5
  tokens, nfe, _ = jax.jit(lambda rng: samplers.sample(
      "first_hitting", oracle, rng, space, shape=(2, 8), steps=1, prefix=prefix))(
          jax.random.key(9))
  assert int(nfe) == 2 * 5 and np.all(np.asarray(tokens)[:, :3] == 4)


def count_oracle(vocab_size: int, length: int):
  """Puts the most mass on value = the row's number of unmasked positions, with a
  confidence that falls with the position index; ignores t."""
  strength = jnp.linspace(8.0, 4.0, length)

  def predict_fn(z, t):
    del t
    count = jnp.sum(z != vocab_size, axis=-1)
    hit = jnp.arange(vocab_size) == count[:, None, None]
    return jnp.where(hit, strength[None, :, None], 0.0)

  return predict_fn


@pytest.mark.parametrize("order", ["confidence", "maskgit"])
def test_one_position_per_step_in_order_of_confidence(order):
  """Temperature 0, L steps, the linear schedule on the uniform grid: one
  position per step, the most confident first, so position i gets the value i."""
  length, vocab_size = 8, 9
  z, nfe = draw_tokens(
      "blocks", count_oracle(vocab_size, length), jax.random.key(10), shape=(2, length),
      vocab_size=vocab_size, schedule=LINEAR, steps=length, grid="uniform", order=order,
      temperature=0.0, choice_temperature=0.0, block_size=length)
  np.testing.assert_array_equal(np.asarray(z), np.tile(np.arange(length), (2, 1)))
  assert int(nfe) == length


def test_blocks_finish_each_block_before_the_next():
  """Random order within blocks of 4: every position of block 0 is revealed while
  fewer than 4 are, every one of block 1 after."""
  length, vocab_size = 8, 9
  z = np.asarray(draw_tokens(
      "blocks", count_oracle(vocab_size, length), jax.random.key(11), shape=(64, length),
      vocab_size=vocab_size, schedule=LINEAR, steps=4, order="random", block_size=4,
      temperature=0.0)[0])
  assert z[:, :4].max() < 4 <= z[:, 4:].min()


def test_threshold_reveals_every_confident_position_at_once():
  """Every position is 0.999 sure: a threshold of 0.9 needs one network call."""
  length, vocab_size = 8, 4
  log_p = np.log(np.full((length, vocab_size), 0.001 / 3))
  log_p[:, 2] = np.log(0.999)
  z, nfe = draw_tokens(
      "llada", factorised_oracle(log_p), jax.random.key(12), shape=(2, length),
      vocab_size=vocab_size, schedule=LINEAR, steps=8, threshold=0.9, temperature=0.0)
  assert int(nfe) == 1 and np.all(np.asarray(z) == 2)


LOOP_OPTIONS = {"t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9}


@pytest.mark.parametrize("strategy,eta", [("cap", 0.04), ("rescale", 0.5), ("loop", 0.1)])
@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_remdm_steps_keep_the_forward_marginals(strategy, eta, grid):
  """Masked share after a step: m_t (1 - reveal) + (1 - m_t) sigma = 1 - alpha_s exactly,
  with 0 <= sigma <= sigma_max and the reveal probability in [0, 1]."""
  alpha_t, alpha_s, sigma, times = remdm.remdm_schedule(
      schedule.get("cosine"), 32, grid, strategy, eta, **LOOP_OPTIONS)
  reveal = (alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t)
  assert np.all((reveal >= 0) & (reveal <= 1))
  assert np.all((sigma >= 0) & (sigma <= np.minimum(1, (1 - alpha_s) / alpha_t) + 1e-12))
  masked_after = (1 - alpha_t) * (1 - reveal) + alpha_t * sigma
  np.testing.assert_allclose(masked_after, 1 - alpha_s, rtol=0, atol=1e-12)
  assert np.any(sigma > 0) and np.all(np.diff(times) <= 1e-6)


def test_remdm_keeps_a_factorised_oracles_marginals():
  """Remasking redraws from the same marginals: the law of each position stays p."""
  length, vocab_size, num = 6, 4, 4000
  p = random_marginals(length, vocab_size, seed=13)
  z, _ = jax.jit(lambda rng, log_p: draw_tokens(
      "remdm", factorised_oracle(log_p), rng, shape=(num, length), vocab_size=vocab_size,
      schedule=LINEAR, steps=16, strategy="rescale", eta=0.5))(
          jax.random.key(14), jnp.log(jnp.asarray(p, jnp.float32)))
  assert_marginals(np.asarray(z), p)


@pytest.mark.parametrize("call,match", [
    (lambda: samplers.options("greedy", {}), "sampler"),
    (lambda: samplers.options("llada", {"eta": 0.1}), "eta"),
    (lambda: ordered.check_ordered_args("best", 1.0, 1.0, 0.0, 0, 4, 8), "order"),
    (lambda: ordered.check_ordered_args("confidence", 1.0, 1.0, 1.5, 0, 4, 8), "threshold"),
    (lambda: ordered.check_ordered_args("confidence", 1.0, 1.0, 0.0, 3, 4, 8), "multiple"),
    (lambda: ordered.check_ordered_args("confidence", -1.0, 1.0, 0.0, 0, 4, 8),
     "temperature"),
    (lambda: remdm.remdm_schedule(LINEAR, 4, "cosine", "sometimes", 0.04, **LOOP_OPTIONS),
     "strategy"),
    (lambda: remdm.remdm_schedule(LINEAR, 4, "cosine", "loop", 0.5, **LOOP_OPTIONS), "eta"),
    (lambda: samplers.sample("remdm", factorised_oracle(np.zeros((4, 3))), jax.random.key(0),
                             prime.SubTokens(prime.Codec(3, 2), LINEAR), shape=(1, 4),
                             steps=2), "remasking"),
])
def test_bad_sampler_options_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("model_type", ["md4", "genmd4", "prime"])
def test_models_sample_with_every_supported_sampler(model_type):
  """Each model draws with each sampler it supports (valid tokens, prefix kept,
  NFE reported) and refuses the others by name."""
  config = tiny_config(model_type=model_type)
  model = models.create(config, 27, (config.seq_len,))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
  prefix = jnp.full((2, 3), 5, jnp.int32)
  options = {"blocks": {"block_size": 8}, "remdm": {"eta": 0.1}}
  for name in samplers.names():
    kwargs = options.get(name, {})
    if name not in model.supports:
      with pytest.raises(ValueError, match=name):
        model.sample(params, jax.random.PRNGKey(1), 2, steps=4, grid="cosine", sampler=name,
                     **kwargs)
      continue
    with progress.bar(model.network_calls(name, 4), name, "call", file=Terminal()) as bar:
      drawn = jax.jit(lambda params, rng, name=name, kwargs=kwargs: model.sample(
          params, rng, 2, steps=4, grid="cosine", prefix=prefix, sampler=name, **kwargs))(
              params, jax.random.PRNGKey(1))
      tokens = np.asarray(drawn.tokens)
      counted = bar.n
    assert tokens.shape == (2, 16) and tokens.min() >= 0 and tokens.max() < 27, name
    assert np.all(tokens[:, :3] == 5), name
    length = model.codec.length if model_type == "prime" else 1
    expected = {"first_hitting": 13 * length}
    assert int(drawn.nfe) == expected.get(name, 4), name
    # The progress bar counts each network call, out of at most network_calls.
    assert counted == int(drawn.nfe) <= model.network_calls(name, 4), name
    assert model.network_calls(name, 4) == {"first_hitting": 16 * length}.get(name, 4)
