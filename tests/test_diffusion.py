"""MD4 NELBO: exact answers with oracle networks, invariances, bad input."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import diffusion, schedule
from tests import exact

VOCAB_SIZE, LENGTH = 5, 8
NUM_BATCHES, BATCH_SIZE = 32, 4096


def _independent_source():
  """Per-position marginals p [L, V], their entropies, and draws x [N, B, L]."""
  log_p = jax.nn.log_softmax(
      1.5 * jax.random.normal(jax.random.PRNGKey(1), (LENGTH, VOCAB_SIZE)))
  entropy = -(jnp.exp(log_p) * log_p).sum()
  x = jax.random.categorical(jax.random.PRNGKey(2), log_p,
                             shape=(NUM_BATCHES, BATCH_SIZE, LENGTH))
  return log_p, entropy, x


def _batch_means(predict_fn, x, sch, **kwargs):
  """Mean NELBO of each of N independent antithetic batches [N]."""
  keys = jax.random.split(jax.random.PRNGKey(3), x.shape[0])
  loss_fn = lambda xb, key: diffusion.loss(
      predict_fn, xb, key, schedule=sch, vocab_size=VOCAB_SIZE, **kwargs)[0].mean()
  return jax.lax.map(lambda args: loss_fn(*args), (x, keys))


@pytest.mark.parametrize("cont_time", [True, False])
@pytest.mark.parametrize("name", ["linear", "cosine", "poly2", "poly3", "geometric"])
def test_oracle_nelbo_matches_the_exact_value(name, cont_time):
  log_p, entropy, x = _independent_source()
  oracle = lambda z, t: jnp.broadcast_to(log_p, z.shape + (VOCAB_SIZE,))
  sch = schedule.get(name)
  means = _batch_means(oracle, x, sch, cont_time=cont_time, timesteps=100)
  closed_form = ((sch.alpha(0.0) - sch.alpha(1.0)) * entropy
                 + diffusion.reconstruction(sch, LENGTH, VOCAB_SIZE)
                 + diffusion.prior(sch, LENGTH, VOCAB_SIZE))
  estimate = means.mean()
  standard_error = means.std(ddof=1) / math.sqrt(len(means))
  ratio = float(estimate / closed_form)
  assert abs(ratio - 1) < 0.015, (name, cont_time, ratio)
  assert abs(estimate - closed_form) < 4 * standard_error + 1e-3 * closed_form, (
      estimate, closed_form)


# Exact expectations over every (t, z): L = 2 tokens of V = 3, position 0
# uniform (where the bound meets the entropy exactly), position 1 skewed.
EXACT_MARGINALS = np.array([[1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
EXACT_SCHEDULES = ["linear", "cosine", "poly0.5", "poly3", "geometric"]


def _exact_source():
  """(sequences [9, 2], p(x) [9], entropy, oracle predict_fn) of EXACT_MARGINALS."""
  sequences = np.array(list(itertools.product(range(3), repeat=2)))
  probs = EXACT_MARGINALS[0][sequences[:, 0]] * EXACT_MARGINALS[1][sequences[:, 1]]
  entropy = float(-(EXACT_MARGINALS * np.log(EXACT_MARGINALS)).sum())
  log_p = jnp.log(jnp.asarray(EXACT_MARGINALS, jnp.float32))
  oracle = lambda z, t: jnp.broadcast_to(log_p, z.shape + (3,))
  return sequences, probs, entropy, oracle


def _exact_nelbo(predict_fn, sch, cont_time, timesteps):
  sequences, probs, _, _ = _exact_source()
  loss_fn = lambda x, z, t: diffusion.loss_given_state(
      predict_fn, x, z, t, schedule=sch, vocab_size=3, cont_time=cont_time,
      timesteps=timesteps)[0]
  times = exact.time_quadrature() if cont_time else exact.discrete_times(timesteps)
  return exact.expected_loss(loss_fn, sequences, probs, sequences, 3, sch, *times)


@pytest.mark.parametrize("cont_time, timesteps", [(True, 1), (False, 1), (False, 8),
                                                  (False, 1000)])
def test_exact_oracle_nelbo_is_the_closed_form_and_never_below_the_entropy(cont_time,
                                                                           timesteps):
  """E[NELBO] over every t and z, with the exact posterior as network, is
  (alpha_0 - alpha_1) H + L (1 - alpha_0) log V + L alpha_1 log V: above the
  entropy H by 2 eps (L log V - H) >= 0, at every eps. Without the prior
  term it is eps (L log V - 2 H) below H here (0.13 nats at eps = 0.1)."""
  _, _, entropy, oracle = _exact_source()
  for name, eps in itertools.product(EXACT_SCHEDULES, [1e-4, 0.1, 0.3]):
    sch = schedule.get(name, eps=eps)
    nelbo = _exact_nelbo(oracle, sch, cont_time, timesteps)
    alpha_0, alpha_1 = float(sch.alpha(0.0)), float(sch.alpha(1.0))
    closed_form = (alpha_0 - alpha_1) * entropy + 2 * (1 - alpha_0 + alpha_1) * math.log(3)
    assert nelbo >= entropy * (1 - 1e-6), (name, eps, nelbo, entropy)
    np.testing.assert_allclose(nelbo, closed_form, rtol=2e-6, err_msg=f"{name} eps={eps}")
    # The check has power: the bound without its prior term fails it.
    assert nelbo - float(diffusion.prior(sch, 2, 3)) < entropy * (1 - 1e-6)


def test_exact_nelbo_of_a_uniform_network_is_l_log_v_at_any_eps():
  uniform = lambda z, t: jnp.zeros(z.shape + (3,))
  for cont_time, name, eps in itertools.product([True, False], ["cosine", "poly0.5"],
                                                [1e-4, 0.3]):
    nelbo = _exact_nelbo(uniform, schedule.get(name, eps=eps), cont_time, 8)
    np.testing.assert_allclose(nelbo, 2 * math.log(3), rtol=2e-6)


def test_loss_is_loss_given_state_at_its_own_draw():
  """loss draws t and z and adds nothing: its value is loss_given_state's
  at that draw, recovered here from the masked fraction of the same keys."""
  _, _, x = _independent_source()
  table = jax.random.normal(jax.random.PRNGKey(5), (VOCAB_SIZE + 1, VOCAB_SIZE))
  network = lambda z, t: table[z] * (1 + t[:, None, None])
  sch = schedule.get("cosine")
  key = jax.random.PRNGKey(6)
  nelbo, aux = diffusion.loss(network, x[0, :64], key, schedule=sch, vocab_size=VOCAB_SIZE)
  rng_t, rng_mask = jax.random.split(key)
  t = diffusion.sample_times(rng_t, 64, antithetic=True)
  z = diffusion.mask_tokens(rng_mask, x[0, :64], sch.alpha(t), VOCAB_SIZE)
  expected, expected_aux = diffusion.loss_given_state(network, x[0, :64], z, t, schedule=sch,
                                                      vocab_size=VOCAB_SIZE)
  np.testing.assert_allclose(nelbo, expected, rtol=1e-6)
  for key in expected_aux:
    np.testing.assert_allclose(aux[key], expected_aux[key], rtol=1e-6)
  np.testing.assert_allclose(aux["loss_prior"], LENGTH * 1e-4 * math.log(VOCAB_SIZE),
                             rtol=1e-5)


def test_time_independent_network_gives_the_same_nelbo_for_every_schedule():
  """The continuous-time NELBO depends on alpha only through a change of variables."""
  _, _, x = _independent_source()
  tables = jax.random.normal(jax.random.PRNGKey(4), (2, VOCAB_SIZE + 1, VOCAB_SIZE))

  def network(z, t):  # Reads both neighbours (mask id included), ignores t.
    left = jnp.pad(z, ((0, 0), (1, 0)), constant_values=VOCAB_SIZE)[:, :-1]
    right = jnp.pad(z, ((0, 0), (0, 1)), constant_values=VOCAB_SIZE)[:, 1:]
    return tables[0][left] + tables[1][right]

  linear = _batch_means(network, x, schedule.get("linear"))
  cosine = _batch_means(network, x[::-1], schedule.get("cosine"))
  difference = linear.mean() - cosine.mean()
  standard_error = math.sqrt((linear.var(ddof=1) + cosine.var(ddof=1)) / len(linear))
  assert abs(difference) < 4 * standard_error, (difference, standard_error)
  assert standard_error < 0.01 * linear.mean()  # The check has power.


def test_aux_reports_bits_per_token():
  _, _, x = _independent_source()
  uniform = lambda z, t: jnp.zeros(z.shape + (VOCAB_SIZE,))
  nelbo, aux = diffusion.loss(uniform, x[0], jax.random.PRNGKey(0),
                              schedule=schedule.get("linear"), vocab_size=VOCAB_SIZE)
  assert nelbo.shape == (BATCH_SIZE,)
  np.testing.assert_allclose(aux["bits_per_token"],
                             nelbo.mean() / (LENGTH * math.log(2)), rtol=1e-6)
  # A uniform network codes every token with log V nats: the bound is exactly log2 V.
  np.testing.assert_allclose(aux["bits_per_token"], math.log2(VOCAB_SIZE), rtol=0.02)


def test_loss_jits_and_differentiates():
  _, _, x = _independent_source()
  table = jnp.zeros((VOCAB_SIZE + 1, VOCAB_SIZE))

  def mean_nelbo(table, key):
    return diffusion.loss(lambda z, t: table[z], x[0, :64], key,
                          schedule=schedule.get("cosine"), vocab_size=VOCAB_SIZE)[0].mean()

  grads = jax.jit(jax.grad(mean_nelbo))(table, jax.random.PRNGKey(0))
  assert jnp.isfinite(grads).all() and jnp.abs(grads).sum() > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_log_prob_value_and_gradient_match_log_softmax(dtype):
  logits = (4.0 * jax.random.normal(jax.random.PRNGKey(4), (3, 6, 11))).astype(dtype)
  x = jax.random.randint(jax.random.PRNGKey(5), (3, 6), 0, 11)
  weights = jax.random.normal(jax.random.PRNGKey(6), (3, 6))

  def reference(logits):
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return (weights * jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]).sum()

  def ours(logits):
    return (weights * diffusion.token_log_prob(logits, x)).sum()

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  grad = jax.jit(jax.grad(ours))(logits)
  assert grad.dtype == dtype
  np.testing.assert_allclose(grad.astype(jnp.float32), jax.grad(reference)(logits).astype(
      jnp.float32), atol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("x, kwargs, match", [
    (np.array([[0, 5]]), {}, "outside \\[0, 5\\)"),
    (np.array([[-1, 2]]), {}, "outside \\[0, 5\\)"),
    (np.array([[0.0, 1.0]]), {}, "x must hold integer"),
    (np.array([0, 1]), {}, "shape \\[B, L"),
    (np.array([[0, 1]]), {"vocab_size": 0}, "vocab_size"),
    (np.array([[0, 1]]), {"cont_time": False, "timesteps": 0}, "timesteps"),
])
def test_bad_input_names_the_argument(x, kwargs, match):
  arguments = {"schedule": schedule.get("linear"), "vocab_size": VOCAB_SIZE, **kwargs}
  predict_fn = lambda z, t: jnp.zeros(z.shape + (VOCAB_SIZE,))
  with pytest.raises(ValueError, match=match):
    diffusion.loss(predict_fn, jnp.asarray(x), jax.random.PRNGKey(0), **arguments)


def test_wrong_logits_shape_is_reported():
  with pytest.raises(ValueError, match="logits of shape"):
    diffusion.loss(lambda z, t: jnp.zeros(z.shape + (3,)), jnp.zeros((2, 4), jnp.int32),
                   jax.random.PRNGKey(0), schedule=schedule.get("linear"), vocab_size=5)
