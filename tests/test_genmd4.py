"""GenMD4: exact NELBOs with oracle networks, an unbiased schedule gradient,
the state-dependent sampler, single-sample gradients, bad input.

Statistical checks are seeded (deterministic) and state their false-alarm
rate under a correct implementation.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4 import diffusion, genmd4, samplers, schedule
from md4.networks.learned_schedule import LearnedPolySchedule, inverse_softplus


def genmd4_sample(predict_fn, rng, *, shape, vocab_size, power, steps, grid="uniform", **kwargs):
  """GenMD4's ancestral sampler: (z, nfe)."""
  space = genmd4.ValueTokens(vocab_size, power, schedule.get("linear"))
  drawn = samplers.sample("ancestral", predict_fn, rng, space, shape=shape, steps=steps,
                          grid=grid, **kwargs)
  return drawn.tokens, drawn.nfe

VOCAB_SIZE, LENGTH = 5, 8
NUM_BATCHES, BATCH_SIZE = 32, 4096
T1, EPS = 1e-3, 1e-4
# Two-sided normal quantile for a false alarm of 1e-5 per comparison.
Z_LIMIT = 4.42


def _independent_source():
  """Per-position marginals log p [L, V], total entropy, draws x [N, B, L]."""
  log_p = jax.nn.log_softmax(
      1.5 * jax.random.normal(jax.random.PRNGKey(1), (LENGTH, VOCAB_SIZE)))
  entropy = -(jnp.exp(log_p) * log_p).sum()
  x = jax.random.categorical(jax.random.PRNGKey(2), log_p,
                             shape=(NUM_BATCHES, BATCH_SIZE, LENGTH))
  return log_p, entropy, x


def _posterior_oracle(log_p, power):
  """The exact q(x^i | z_t) of independent tokens: p_i(v) t^{w_v}, normalised."""
  return lambda z, t: jnp.broadcast_to(
      log_p + power * jnp.log(t)[:, None, None], z.shape + (log_p.shape[-1],))


def _batch_means(loss_fn, x, seed):
  """Mean of loss_fn(x_b, key_b) [B] over each of N batches [N]."""
  keys = jax.random.split(jax.random.PRNGKey(seed), x.shape[0])
  return jax.lax.map(lambda args: loss_fn(*args).mean(), (x, keys))


def _exact_nelbo(log_p, power, t1, eps):
  """E[NELBO] with the exact posterior as network, for independent tokens.

  With the true reverse process the bound's only gaps are the prior at t = 1
  and the recon decoder r(v) ∝ t1^{w_v} at t1:
  E[NELBO] = H + KL(q(z_1) || p(z_1)) + E KL(q(x | z_t1) || r), per position
  H_i + eps (log V - H_i) + P_i(masked at t1) KL(post_i || r).
  """
  p = jnp.exp(log_p)
  entropy = -(p * log_p).sum(-1)
  vocab_size = log_p.shape[-1]
  log_r = jax.nn.log_softmax(power * math.log(t1))
  log_post = jax.nn.log_softmax(log_p + power * math.log(t1), axis=-1)
  masked_at_t1 = (1 - eps) * (p * t1**power).sum(-1)
  decoder_gap = masked_at_t1 * (jnp.exp(log_post) * (log_post - log_r)).sum(-1)
  return (entropy + eps * (math.log(vocab_size) - entropy) + decoder_gap).sum()


def test_equal_exponents_match_md4_linear_and_the_exact_value():
  log_p, entropy, x = _independent_source()
  oracle = lambda z, t: jnp.broadcast_to(log_p, z.shape + (VOCAB_SIZE,))
  power = jnp.ones(VOCAB_SIZE)
  gen = _batch_means(lambda xb, key: genmd4.loss(
      oracle, xb, key, power=power, vocab_size=VOCAB_SIZE, t1=T1, eps=EPS)[1], x, 3)
  sch = schedule.get("linear", eps=EPS)
  md4 = _batch_means(lambda xb, key: diffusion.loss(
      oracle, xb, key, schedule=sch, vocab_size=VOCAB_SIZE)[0], x, 4)
  # w = 1: (alpha_t1 - alpha_1) H + recon + prior, recon coding uniformly.
  exact_gen = ((1 - EPS) * (1 - T1) * entropy
               + LENGTH * ((1 - EPS) * T1 + EPS) * math.log(VOCAB_SIZE))
  np.testing.assert_allclose(exact_gen, _exact_nelbo(log_p, power, T1, EPS), rtol=1e-6)
  exact_md4 = ((sch.alpha(0.0) - sch.alpha(1.0)) * entropy
               + diffusion.reconstruction(sch, LENGTH, VOCAB_SIZE))
  standard_error = lambda means: float(means.std(ddof=1) / math.sqrt(len(means)))
  for means, exact in [(gen, exact_gen), (md4, exact_md4)]:
    assert abs(means.mean() - exact) < Z_LIMIT * standard_error(means), (
        means.mean(), exact, standard_error(means))
    assert standard_error(means) < 5e-3 * exact  # The check has power.
  # Same x in both: the paired difference cancels the data's own variance.
  difference = gen - md4
  assert abs(difference.mean() - (exact_gen - exact_md4)) < (
      Z_LIMIT * standard_error(difference)), (difference.mean(), exact_gen - exact_md4)


def test_exact_posterior_with_unequal_exponents_gives_the_exact_nelbo():
  log_p, _, x = _independent_source()
  power = jnp.array([0.5, 1.0, 2.0, 3.0, 0.7])
  oracle = _posterior_oracle(log_p, power)
  means = _batch_means(lambda xb, key: genmd4.loss(
      oracle, xb, key, power=power, vocab_size=VOCAB_SIZE, t1=T1, eps=EPS)[1], x, 5)
  exact = _exact_nelbo(log_p, power, T1, EPS)
  standard_error = float(means.std(ddof=1) / math.sqrt(len(means)))
  assert abs(means.mean() - exact) < Z_LIMIT * standard_error, (
      means.mean(), exact, standard_error)
  assert standard_error < 5e-3 * exact
  # The marginal p_i is the wrong network once exponents differ: the bound is looser.
  marginal = lambda z, t: jnp.broadcast_to(log_p, z.shape + (VOCAB_SIZE,))
  loose = _batch_means(lambda xb, key: genmd4.loss(
      marginal, xb, key, power=power, vocab_size=VOCAB_SIZE, t1=T1, eps=EPS)[1], x, 5)
  assert loose.mean() - exact > 10 * standard_error


# A tiny problem whose masks can be enumerated: L = 2, V = 3.
SMALL_V = 3
SMALL_POWER = jnp.array([0.6, 1.3, 2.0])
SMALL_TABLE = jax.random.normal(jax.random.PRNGKey(7), (2, SMALL_V + 1, SMALL_V))
SMALL_SLOPE = jax.random.normal(jax.random.PRNGKey(8), (2, SMALL_V))


def _small_network(z, t):
  """Position i reads the other position's state (mask id included) and t."""
  other = z[:, ::-1]
  return (jnp.stack([SMALL_TABLE[0][other[:, 0]], SMALL_TABLE[1][other[:, 1]]], 1)
          + t[:, None, None] * SMALL_SLOPE)


def _direct_integrand(logits, x, z, t, power, vocab_size):
  """sum_{masked i} sum_v (-w_v / t) [(log mu_i[x^i] + 1) delta(v = x^i) - mu_i[v]] [B]."""
  log_mu = jax.nn.log_softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(x, vocab_size)
  log_mu_x = (one_hot * log_mu).sum(-1, keepdims=True)
  terms = (-power / t[:, None, None]) * ((log_mu_x + 1) * one_hot - jnp.exp(log_mu))
  return jnp.where((z == vocab_size)[..., None], terms, 0.0).sum((1, 2))


def _expected_integrand(power, x, t):
  """E_{z ~ q(z_t | x)} of the integrand, by enumerating the 4 masks; x [2], t []."""
  mask_prob = (1 - EPS) * t**power[x]
  total = 0.0
  for masks in itertools.product([False, True], repeat=2):
    masks = jnp.array(masks)
    z = jnp.where(masks, SMALL_V, x)[None]
    prob = jnp.prod(jnp.where(masks, mask_prob, 1 - mask_prob))
    value = _direct_integrand(_small_network(z, t[None]), x[None], z, t[None],
                              power, SMALL_V)[0]
    total = total + prob * value
  return total


def test_leave_one_out_gradient_of_the_exponents_is_unbiased():
  cases = [(x, t) for x in ([0, 2], [1, 1]) for t in (0.3, 0.8)]
  draws = 4000
  x = jnp.repeat(jnp.array([c[0] for c in cases], jnp.int32), draws, axis=0)
  t = jnp.repeat(jnp.array([c[1] for c in cases], jnp.float32), draws)

  def per_row(power, x, t, output):
    outputs = genmd4.diffusion_loss(_small_network, x, t, jax.random.PRNGKey(9),
                                    power=power, vocab_size=SMALL_V, eps=EPS)
    return outputs[output]

  # Forward mode: one pass per exponent gives every row's gradient [rows, V].
  grads, pathwise, values = jax.jit(lambda w, x, t: (
      jax.jacfwd(per_row)(w, x, t, 0), jax.jacfwd(per_row)(w, x, t, 1),
      per_row(w, x, t, 1)))(SMALL_POWER, x, t)
  grads = grads.reshape(len(cases), draws, SMALL_V)
  pathwise = pathwise.reshape(len(cases), draws, SMALL_V)
  values = values.reshape(len(cases), draws)
  exact = jax.jit(jax.value_and_grad(_expected_integrand))
  worst_pathwise_z = 0.0
  for k, (x_case, t_case) in enumerate(cases):
    exact_value, exact_grad = exact(SMALL_POWER, jnp.array(x_case), jnp.float32(t_case))
    value_se = values[k].std(ddof=1) / math.sqrt(draws)
    assert abs(values[k].mean() - exact_value) < Z_LIMIT * value_se
    grad_se = grads[k].std(0, ddof=1) / math.sqrt(draws)
    z_scores = (grads[k].mean(0) - exact_grad) / grad_se
    # 12 comparisons at |z| < 4.42: family false-alarm rate < 1.2e-4.
    assert jnp.all(jnp.abs(z_scores) < Z_LIMIT), (k, grads[k].mean(0), exact_grad)
    pathwise_se = pathwise[k].std(0, ddof=1) / math.sqrt(draws)
    worst_pathwise_z = max(worst_pathwise_z, float(
        jnp.max(jnp.abs(pathwise[k].mean(0) - exact_grad) / pathwise_se)))
  # Without the REINFORCE term the gradient is biased, and the check sees it.
  assert worst_pathwise_z > 20, worst_pathwise_z


def _sampler_counts(power_trained, power_sampled, p, num_samples, seed):
  """Joint counts [V^L] of samples from the sampler with the exact-posterior oracle."""
  log_p = jnp.log(p)
  oracle = _posterior_oracle(log_p, power_trained)
  length, vocab_size = p.shape
  draw = jax.jit(lambda rng: genmd4_sample(
      oracle, rng, shape=(num_samples, length), vocab_size=vocab_size,
      power=power_sampled, steps=6))
  z = np.asarray(draw(jax.random.PRNGKey(seed))[0])
  assert z.dtype == np.int32 and z.min() >= 0 and z.max() < vocab_size
  cells = np.ravel_multi_index(z.T, (vocab_size,) * length)
  return np.bincount(cells, minlength=vocab_size**length)


def test_sampler_reproduces_a_factorised_distribution():
  p = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25] * 4])
  power = jnp.array([0.4, 1.0, 2.5, 5.0])
  num_samples = 8000
  expected = num_samples * np.einsum("a,b,c->abc", *p).ravel()
  assert expected.min() >= 5  # The chi-square approximation holds.
  # False-alarm rate 1e-3.
  limit = stats.chi2.ppf(1 - 1e-3, df=len(expected) - 1)
  counts = _sampler_counts(power, power, p, num_samples, seed=10)
  chi_square = ((counts - expected)**2 / expected).sum()
  assert chi_square < limit, (chi_square, limit)
  # Revealing with MD4's value-blind probabilities skews the result, visibly.
  blind = _sampler_counts(power, jnp.ones(4), p, num_samples, seed=10)
  assert ((blind - expected)**2 / expected).sum() > 3 * limit


def test_sampler_reuse_outputs_gives_identical_samples():
  """A network that reads z, not t: reusing its output after steps that
  revealed nothing changes no sample and saves calls; one that reads t is refused."""
  table = jax.random.normal(jax.random.PRNGKey(12), (VOCAB_SIZE + 1, VOCAB_SIZE))
  network = lambda z, t: 2.0 * table[jnp.roll(z, 1, axis=1)]
  power = jnp.array([0.5, 1.0, 2.0, 3.0, 0.7])
  outputs = [jax.jit(lambda rng: genmd4_sample(
      network, rng, shape=(8, LENGTH), vocab_size=VOCAB_SIZE, power=power, steps=100,
      reuse_outputs=reuse))(jax.random.PRNGKey(13)) for reuse in (False, True)]
  np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
  assert int(outputs[0][1]) == 100 and int(outputs[1][1]) <= 8 * LENGTH + 1
  with pytest.raises(ValueError, match="reads t"):
    genmd4_sample(lambda z, t: network(z, t) * t[:, None, None], jax.random.PRNGKey(13),
                  shape=(8, LENGTH), vocab_size=VOCAB_SIZE, power=power, steps=4,
                  reuse_outputs=True)


def _table_network(params, vocab_size):
  """A small network with parameters: position i reads the state at i - 1."""
  def predict_fn(z, t):
    left = jnp.pad(z, ((0, 0), (1, 0)), constant_values=vocab_size)[:, :-1]
    return params["table"][left] + params["slope"] * t[:, None, None]
  return predict_fn


def _params_power_and_batch():
  keys = jax.random.split(jax.random.PRNGKey(11), 4)
  params = {"table": jax.random.normal(keys[0], (VOCAB_SIZE + 1, VOCAB_SIZE)),
            "slope": jax.random.normal(keys[1], (VOCAB_SIZE,))}
  power = jnp.exp(0.5 * jax.random.normal(keys[2], (VOCAB_SIZE,)))
  x = jax.random.randint(keys[3], (64, LENGTH), 0, VOCAB_SIZE)
  t = jnp.linspace(0.05, 1.0, 64)
  return params, power, x, t


def test_network_gradient_of_the_surrogate():
  """Both copies' mean by default; copy 1 alone with single_sample."""
  params, power, x, t = _params_power_and_batch()
  rng = jax.random.PRNGKey(12)

  @jax.jit
  def gradients(params, power, x, t):
    results = {}
    for single_sample in (False, True):
      surrogate = lambda q, w: genmd4.diffusion_loss(
          _table_network(q, VOCAB_SIZE), x, t, rng, power=w, vocab_size=VOCAB_SIZE,
          single_sample=single_sample)[:2]
      (value, estimate), grads = jax.value_and_grad(
          lambda q, w: (surrogate(q, w)[0].mean(), surrogate(q, w)[1]),
          argnums=(0, 1), has_aux=True)(params, power)
      results[single_sample] = (value, estimate, *grads)
    # The two copies, rebuilt as the docstring says, and their own gradients.
    copy_grad = jax.grad(lambda q, z: _direct_integrand(
        _table_network(q, VOCAB_SIZE)(z, t), x, z, t, power, VOCAB_SIZE).mean())
    copies = [copy_grad(params, genmd4.mask_tokens(key, x, t, power, 1e-4, VOCAB_SIZE))
              for key in jax.random.split(rng)]
    return results, copies

  results, (first, second) = gradients(params, power, x, t)
  assert not np.allclose(first["table"], second["table"])  # The copies differ.
  for single_sample, (value, estimate, grad_net, grad_power) in results.items():
    np.testing.assert_allclose(value, estimate.mean(), rtol=1e-6)
    expected = first if single_sample else jax.tree_util.tree_map(
        lambda a, b: 0.5 * (a + b), first, second)
    for name in params:
      np.testing.assert_allclose(grad_net[name], expected[name], rtol=1e-4, atol=1e-6)
    # The schedule's gradient uses both copies either way.
    np.testing.assert_allclose(grad_power, results[False][3], rtol=1e-5)


def test_loss_outputs_and_aux():
  params, power, x, _ = _params_power_and_batch()
  predict_fn = _table_network(params, VOCAB_SIZE)
  surrogate, nelbo, aux = jax.jit(lambda xb, key: genmd4.loss(
      predict_fn, xb, key, power=power, vocab_size=VOCAB_SIZE))(x, jax.random.PRNGKey(0))
  assert surrogate.shape == nelbo.shape == (64,)
  np.testing.assert_allclose(surrogate, nelbo, rtol=1e-6)
  np.testing.assert_allclose(aux["bits_per_token"],
                             nelbo.mean() / (LENGTH * math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(
      aux["loss_diffusion"] + aux["loss_recon"] + aux["loss_prior"], nelbo.mean(),
      rtol=1e-5)
  np.testing.assert_allclose(aux["loss_prior"], LENGTH * 1e-4 * math.log(VOCAB_SIZE))
  np.testing.assert_allclose(
      [aux["power_min"], aux["power_mean"], aux["power_max"]],
      [power.min(), power.mean(), power.max()], rtol=1e-6)
  assert 0 < aux["masked_fraction"] < 1
  grads = jax.jit(jax.grad(lambda q, w, xb: genmd4.loss(
      _table_network(q, VOCAB_SIZE), xb, jax.random.PRNGKey(0), power=w,
      vocab_size=VOCAB_SIZE)[0].mean(), argnums=(0, 1)))(params, power, x)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert jnp.isfinite(leaf).all() and jnp.abs(leaf).sum() > 0


def test_learned_schedule_owns_phi_with_a_vocab_axis():
  module = LearnedPolySchedule(VOCAB_SIZE, init_power=2.5)
  variables = module.init(jax.random.PRNGKey(0))
  assert nn.get_partition_spec(variables)["params"]["phi"] == jax.sharding.PartitionSpec("vocab")
  np.testing.assert_allclose(module.apply(variables), np.full(VOCAB_SIZE, 2.5), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.softplus(inverse_softplus(1e-3)), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(jax.nn.softplus(inverse_softplus(30.0)), 30.0, rtol=1e-6)
  grad = jax.grad(lambda v: module.apply(v)[1])(variables)
  np.testing.assert_allclose(nn.unbox(grad)["params"]["phi"],
                             np.eye(VOCAB_SIZE)[1] * jax.nn.sigmoid(inverse_softplus(2.5)),
                             rtol=1e-6)
  for kwargs, match in [({"vocab_size": 0}, "vocab_size"),
                        ({"vocab_size": 3, "init_power": 0.0}, "init_power")]:
    with pytest.raises(ValueError, match=match):
      LearnedPolySchedule(**kwargs).init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("kwargs, match", [
    ({"power": jnp.ones(4)}, "power must have shape"),
    ({"power": -jnp.ones(VOCAB_SIZE)}, "power must be positive"),
    ({"power": jnp.ones(VOCAB_SIZE, jnp.int32)}, "power must be a float"),
    ({"t1": 0.0}, "t1"),
    ({"t1": 1.0}, "t1"),
    ({"eps": 1.0}, "eps"),
    ({"vocab_size": 0}, "vocab_size"),
])
def test_bad_loss_input_names_the_argument(kwargs, match):
  arguments = {"power": jnp.ones(VOCAB_SIZE), "vocab_size": VOCAB_SIZE, **kwargs}
  with pytest.raises(ValueError, match=match):
    genmd4.loss(lambda z, t: jnp.zeros(z.shape + (VOCAB_SIZE,)),
                jnp.zeros((2, 4), jnp.int32), jax.random.PRNGKey(0), **arguments)


def test_bad_tokens_and_logits_are_reported():
  uniform = lambda z, t: jnp.zeros(z.shape + (VOCAB_SIZE,))
  with pytest.raises(ValueError, match="outside"):
    genmd4.loss(uniform, jnp.full((2, 4), VOCAB_SIZE), jax.random.PRNGKey(0),
                power=jnp.ones(VOCAB_SIZE), vocab_size=VOCAB_SIZE)
  with pytest.raises(ValueError, match="logits of shape"):
    genmd4.loss(lambda z, t: jnp.zeros(z.shape + (3,)), jnp.zeros((2, 4), jnp.int32),
                jax.random.PRNGKey(0), power=jnp.ones(VOCAB_SIZE), vocab_size=VOCAB_SIZE)
  with pytest.raises(ValueError, match="t must have shape"):
    genmd4.diffusion_loss(uniform, jnp.zeros((2, 4), jnp.int32), jnp.ones(3),
                          jax.random.PRNGKey(0), power=jnp.ones(VOCAB_SIZE),
                          vocab_size=VOCAB_SIZE)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"shape": (4,)}, "shape"),
    ({"power": jnp.ones(3)}, "power must have shape"),
    ({"grid": "log"}, "grid"),
])
def test_bad_sampler_input_names_the_argument(kwargs, match):
  arguments = {"shape": (2, 4), "vocab_size": VOCAB_SIZE,
               "power": jnp.ones(VOCAB_SIZE), "steps": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    genmd4_sample(lambda z, t: jnp.zeros(z.shape + (VOCAB_SIZE,)),
                  jax.random.PRNGKey(0), **arguments)
