"""MD4 NELBO: exact answers with oracle networks, invariances, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import diffusion, schedule

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
  exact = ((sch.alpha(0.0) - sch.alpha(1.0)) * entropy
           + diffusion.reconstruction(sch, LENGTH, VOCAB_SIZE))
  estimate = means.mean()
  standard_error = means.std(ddof=1) / math.sqrt(len(means))
  ratio = float(estimate / exact)
  assert abs(ratio - 1) < 0.015, (name, cont_time, ratio)
  assert abs(estimate - exact) < 4 * standard_error + 1e-3 * exact, (estimate, exact)


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
