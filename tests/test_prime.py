"""MDM-Prime: codec, carry-over, sub-token NELBO and sampler, against exact answers."""

import itertools
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import pytest
from scipy import stats

from md4 import diffusion, prime, samplers, schedule
from tests import exact

# Edge cases: 1, 2, powers of many bases (b**l exactly), their neighbours,
# text8's 27, GPT-2's 50257, and the top of the range.
SWEEP_CLASSES = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 26, 27, 28, 63, 64, 65, 81, 100,
                 243, 255, 256, 257, 1000, 1024, 1025, 4096, 6561, 32768, 50257,
                 65535, 65536, 65537, 70000)
FALSE_ALARM = 1e-3  # Per chi-square test; every test is seeded, so deterministic.


def _digits(value: int, base: int, length: int) -> list[int]:
  """Base-b digits of value, most significant first (Python integers)."""
  return [(value // base**(length - 1 - j)) % base for j in range(length)]


def _permutation(num_classes: int, seed: int | None) -> np.ndarray:
  if seed is None:
    return np.arange(num_classes)
  return np.random.default_rng(seed).permutation(num_classes)


# ---------------------------------------------------------------- codec


@pytest.mark.parametrize("seed", [None, 7])
def test_codec_round_trips_every_class_for_every_length(seed):
  for num_classes in SWEEP_CLASSES:
    classes = np.arange(num_classes)
    permutation = _permutation(num_classes, seed)
    for length in range(1, 18):
      codec = prime.Codec(num_classes=num_classes, length=length, shuffle_seed=seed)
      base = codec.base
      assert base**length >= num_classes and (base - 1)**length < num_classes
      assert codec.mask_id == base
      codes = codec.encode(classes)
      assert codes.shape == (num_classes, length) and codes.dtype == np.int32
      assert codes.min() >= 0 and codes.max() < max(base, 1)
      np.testing.assert_array_equal(codec.decode(codes), classes)
      # The last class's code is the base-b expansion of its permuted index.
      assert list(codes[-1]) == _digits(int(permutation[-1]), base, length)


@pytest.mark.parametrize("seed", [None, 3])
def test_binary_codec_round_trips(seed):
  for num_classes in SWEEP_CLASSES:
    codec = prime.Codec(num_classes=num_classes, binary=True, shuffle_seed=seed)
    length = codec.length
    assert codec.base == 2 and 2**length >= num_classes
    assert length == 1 or 2**(length - 1) < num_classes
    classes = np.arange(num_classes)
    np.testing.assert_array_equal(codec.decode(codec.encode(classes)), classes)
  assert prime.Codec(50257, binary=True).length == 16
  assert prime.Codec(65536, length=16, binary=True).length == 16


def test_shuffling_is_a_fixed_seeded_permutation():
  plain = prime.Codec(27, 3)
  shuffled = prime.Codec(27, 3, shuffle_seed=5)
  again = prime.Codec(27, 3, shuffle_seed=5)
  np.testing.assert_array_equal(shuffled.digit_table, again.digit_table)
  assert (shuffled.digit_table != plain.digit_table).any()
  # Same set of codes, assigned to other classes.
  assert (sorted(map(tuple, shuffled.digit_table))
          == sorted(map(tuple, plain.digit_table)))


@pytest.mark.parametrize("num_classes, length", [(70000, 17), (70000, 1), (27, 17)])
def test_jax_arrays_and_jit_agree_with_numpy(num_classes, length):
  codec = prime.Codec(num_classes, length, shuffle_seed=1)
  classes = np.random.default_rng(0).integers(0, num_classes, (3, 50))
  codes = codec.encode(classes)
  round_trip = jax.jit(lambda x: codec.decode(codec.encode(x)))
  np.testing.assert_array_equal(jax.jit(codec.encode)(jnp.asarray(classes)), codes)
  np.testing.assert_array_equal(round_trip(jnp.asarray(classes)), classes)
  assert jax.jit(codec.is_valid)(jnp.asarray(codes)).all()


def _brute_force_valid(digits, base: int, num_classes: int) -> bool:
  if any(d < 0 or d >= base for d in digits):
    return False
  return sum(d * base**(len(digits) - 1 - j) for j, d in enumerate(digits)) < num_classes


@pytest.mark.parametrize("num_classes, length, binary", [
    (5, None, True), (7, 2, False), (10, 3, False), (12, None, True), (1, 2, False)])
def test_every_invalid_digit_string_is_rejected(num_classes, length, binary):
  codec = prime.Codec(num_classes, length, shuffle_seed=2, binary=binary)
  # Every string over {-1, 0..b-1, b (the mask id)}.
  strings = np.array(list(itertools.product(range(-1, codec.base + 1),
                                            repeat=codec.length)), np.int32)
  expected = np.array([_brute_force_valid(s, codec.base, num_classes) for s in strings])
  np.testing.assert_array_equal(codec.is_valid(strings), expected)
  np.testing.assert_array_equal(jax.jit(codec.is_valid)(jnp.asarray(strings)), expected)
  assert expected.sum() == num_classes
  codec.decode(strings[expected])
  for string in strings[~expected]:
    with pytest.raises(ValueError, match="encode no class"):
      codec.decode(string)


@pytest.mark.parametrize("num_classes, length", [(70000, 17), (27, 17), (50257, 2),
                                                 (50257, 3), (70000, 9)])
def test_large_invalid_codes_are_rejected_without_overflow(num_classes, length):
  """Strings worth up to b**l - 1 >> C (131071 for C = 27, l = 17): capped place
  values keep the int32 arithmetic exact."""
  codec = prime.Codec(num_classes, length)
  base = codec.base
  rng = np.random.default_rng(0)
  strings = rng.integers(0, base, (2000, length)).astype(np.int32)
  leading_zeros = rng.integers(0, length, len(strings))
  strings[np.arange(length) < leading_zeros[:, None]] = 0  # Also small values.
  strings[0] = base - 1
  expected = np.array([_brute_force_valid(s, base, num_classes) for s in strings])
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(codec.is_valid(strings), expected)
  with pytest.raises(ValueError, match="encode no class"):
    codec.decode(strings)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0, "length": 2}, "num_classes"),
    ({"num_classes": 2.0, "length": 2}, "num_classes"),
    ({"num_classes": 10, "length": 0}, "length"),
    ({"num_classes": 10}, "length"),
    ({"num_classes": 10, "length": 3, "binary": True}, "contradicts binary"),
    ({"num_classes": 10, "length": 2, "shuffle_seed": 1.5}, "shuffle_seed"),
])
def test_bad_codec_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    prime.Codec(**kwargs)


def test_bad_encode_and_decode_input_is_named():
  codec = prime.Codec(10, 2)
  with pytest.raises(ValueError, match="x has class ids"):
    codec.encode(np.array([0, 10]))
  with pytest.raises(ValueError, match="x must hold integer"):
    codec.encode(np.array([0.0]))
  with pytest.raises(ValueError, match="y must have shape"):
    codec.decode(np.zeros((4, 3), np.int32))
  with pytest.raises(ValueError, match="y must hold integer"):
    codec.decode(np.zeros((4, 2)))


# ---------------------------------------------------------------- carry-over


def _codes(codec: prime.Codec, seed) -> np.ndarray:
  """f(c) for every class [C, l], from Python integers (independent of the codec)."""
  permutation = _permutation(codec.num_classes, seed)
  return np.array([_digits(int(v), codec.base, codec.length) for v in permutation])


CARRY_OVER_CODECS = [(7, 2, False, 4), (5, None, True, None), (10, 3, False, 9),
                     (6, None, True, 1)]


@pytest.mark.parametrize("num_classes, length, binary, seed", CARRY_OVER_CODECS)
def test_allowed_sets_equal_brute_force_on_every_partial_state(num_classes, length,
                                                               binary, seed):
  codec = prime.Codec(num_classes, length, shuffle_seed=seed, binary=binary)
  codes = _codes(codec, seed)
  states = np.array(list(itertools.product(range(codec.base + 1),
                                           repeat=codec.length)), np.int32)
  expected = np.array([[all(s == codec.mask_id or s == d for s, d in zip(state, code))
                        for code in codes] for state in states])
  np.testing.assert_array_equal(prime.allowed_classes(jnp.asarray(states), codec),
                                expected)
  # Every partial masking of a valid code keeps its class allowed.
  for code_index, code in enumerate(codes):
    for masked in itertools.product([False, True], repeat=codec.length):
      state = np.where(masked, codec.mask_id, code)
      row = np.flatnonzero((states == state).all(axis=1))[0]
      assert expected[row, code_index]


@pytest.mark.parametrize("num_classes, length, binary, seed", CARRY_OVER_CODECS)
def test_sub_token_marginals_equal_brute_force(num_classes, length, binary, seed):
  codec = prime.Codec(num_classes, length, shuffle_seed=seed, binary=binary)
  codes = _codes(codec, seed)
  patterns = list(itertools.product([False, True], repeat=codec.length))
  y_0 = np.repeat(codes, len(patterns), axis=0)
  masked = np.tile(np.array(patterns), (num_classes, 1))
  y_t = np.where(masked, codec.mask_id, y_0)
  logits = np.random.default_rng(0).normal(size=(len(y_0), num_classes)) * 2
  expected = np.zeros(y_0.shape)
  for n in range(len(y_0)):
    allowed = [all(s == codec.mask_id or s == d for s, d in zip(y_t[n], code))
               for code in codes]
    posterior = np.where(allowed, np.exp(logits[n]), 0.0)
    posterior /= posterior.sum()
    for j in range(codec.length):
      expected[n, j] = np.log(posterior[codes[:, j] == y_0[n, j]].sum())
  got = jax.jit(lambda *args: prime.sub_token_log_prob(*args, codec))(
      jnp.asarray(logits, jnp.float32), jnp.asarray(y_t), jnp.asarray(y_0))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Revealed sub-tokens are certain.
  np.testing.assert_array_equal(np.asarray(got)[~masked], 0.0)


def _largest_output(jaxpr) -> int:
  """Largest output of any equation, inside loops and branches too."""
  sizes = [0]
  for eqn in jaxpr.eqns:
    sizes += [math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else [param]):
        if isinstance(sub, jax_core.ClosedJaxpr):
          sizes.append(_largest_output(sub.jaxpr))
        elif isinstance(sub, jax_core.Jaxpr):
          sizes.append(_largest_output(sub))
  return max(sizes)


def test_carry_over_never_materialises_logits_times_length():
  """No intermediate of the loss or sampler is bigger than the logits [B, L, C]."""
  codec = prime.Codec(50257, binary=True)
  batch, length = 4, 8
  limit = batch * length * codec.num_classes
  network = lambda y, t: jnp.zeros(y.shape[:-1] + (codec.num_classes,))
  x = jnp.zeros((batch, length), jnp.int32)
  sch = schedule.get("linear")
  loss_jaxpr = jax.make_jaxpr(lambda key: prime.loss(
      network, x, key, codec=codec, schedule=sch, objective="joint"))(
          jax.random.PRNGKey(0))
  sample_jaxpr = jax.make_jaxpr(lambda key: prime.sample(
      network, key, shape=(batch, length), codec=codec, schedule=sch, steps=2,
      top_p=0.9, reuse_outputs=True))(jax.random.PRNGKey(0))
  assert _largest_output(loss_jaxpr.jaxpr) <= limit
  assert _largest_output(sample_jaxpr.jaxpr) <= limit


# (C, l, shuffle seed): C a power of b or not, padded code space b^l up to 3 C.
AGREEMENT_CODECS = [(7, 2, None), (7, 2, 3), (27, 2, 1), (27, 3, None), (27, 3, 8),
                    (5, 4, 2), (6, 3, 0), (100, 3, 5), (1000, 2, 0), (256, 4, None),
                    (9, 2, None), (6, 1, None), (1, 1, None), (50257, 2, 1),
                    (50257, 3, None)]


@pytest.mark.parametrize("num_classes, length, seed", AGREEMENT_CODECS)
def test_agreement_path_equals_per_slot_path(num_classes, length, seed):
  """Same log mu and same gradient w.r.t. the logits, on random logits (wide
  and narrow) and random masks, every pattern included."""
  codec = prime.Codec(num_classes, length, shuffle_seed=seed)
  rng = np.random.default_rng(num_classes * 10 + length)
  shape = (2, 3 * 2**length)
  y_0 = jnp.asarray(codec.encode(rng.integers(0, num_classes, shape)))
  masked = rng.random(shape + (length,)) < 0.5
  # Row 0 runs through every mask pattern.
  masked[0, :2**length] = np.array(list(itertools.product([False, True],
                                                          repeat=length)))
  y_t = jnp.where(masked, codec.mask_id, y_0)
  scales = jnp.asarray([1.0, 20.0])[:, None, None]
  logits = jnp.asarray(rng.normal(size=shape + (num_classes,)), jnp.float32) * scales
  cotangent = jnp.asarray(rng.normal(size=shape + (length,)), jnp.float32)

  def value_and_grad(log_prob_fn):
    weighted = lambda logits: (log_prob_fn(logits, y_t, y_0, codec) * cotangent).sum()
    return jax.jit(lambda logits: (log_prob_fn(logits, y_t, y_0, codec),
                                   jax.grad(weighted)(logits)))(logits)

  got, got_grad = value_and_grad(prime._agreement_log_prob)
  expected, expected_grad = value_and_grad(prime._per_slot_log_prob)
  assert np.isfinite(got).all() and np.isfinite(got_grad).all()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got)[masked == 0], 0.0)
  np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_classes, length, seed", [(27, 2, 4), (100, 3, None)])
def test_loss_and_its_gradient_are_the_same_on_both_paths(num_classes, length, seed,
                                                          monkeypatch):
  codec = prime.Codec(num_classes, length, shuffle_seed=seed)
  x = np.random.default_rng(0).integers(0, num_classes, (16, 12))
  table = jnp.asarray(np.random.default_rng(1).normal(
      size=(length, codec.base + 1, num_classes)), jnp.float32)

  def loss_and_grad(agreement):
    monkeypatch.setattr(prime, "_gathers_agreement_sets", lambda codec: agreement)

    def mean_loss(table):
      network = lambda y, t: sum(table[j][y[..., j]] * (1 + t[:, None, None])
                                 for j in range(length))
      return prime.loss(network, x, jax.random.PRNGKey(3), codec=codec,
                        schedule=schedule.get("cosine"))[0].mean()

    return jax.jit(jax.value_and_grad(mean_loss))(table)

  loss, grad = loss_and_grad(True)
  per_slot_loss, per_slot_grad = loss_and_grad(False)
  np.testing.assert_allclose(loss, per_slot_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, per_slot_grad, rtol=1e-5, atol=1e-6)
  assert jnp.abs(grad).sum() > 0


@pytest.mark.parametrize("length, agreement", [(1, True), (2, True), (3, True),
                                               (4, False), (16, False)])
def test_short_codes_take_the_agreement_path_without_large_arrays(length, agreement):
  codec = prime.Codec(50257, length, binary=length == 16)
  assert prime._gathers_agreement_sets(codec) == agreement
  batch, positions = 2, 4
  logits = jnp.zeros((batch, positions, codec.num_classes))
  y_0 = jnp.zeros((batch, positions, length), jnp.int32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda logits: prime.sub_token_log_prob(
      logits, jnp.full_like(y_0, codec.mask_id), y_0, codec).sum()))(logits)
  assert _largest_output(jaxpr.jaxpr) <= logits.size


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("cont_time, antithetic", [(True, True), (False, False)])
def test_length_one_is_md4_draw_for_draw(cont_time, antithetic):
  num_classes = 6
  codec = prime.Codec(num_classes, 1)
  tables = jnp.asarray(np.random.default_rng(0).normal(
      size=(2, num_classes + 1, num_classes)), jnp.float32)

  def network(z, t):  # Reads its left neighbour (mask id included) and t.
    left = jnp.pad(z, ((0, 0), (1, 0)), constant_values=num_classes)[:, :-1]
    return tables[0][z] + tables[1][left] * t[:, None, None]

  x = np.random.default_rng(1).integers(0, num_classes, (64, 10))
  kwargs = dict(schedule=schedule.get("cosine"), cont_time=cont_time, timesteps=10,
                antithetic=antithetic)
  md4_nelbo, md4_aux = jax.jit(lambda key: diffusion.loss(
      network, x, key, vocab_size=num_classes, **kwargs))(jax.random.PRNGKey(2))
  nelbo, aux = jax.jit(lambda key: prime.loss(
      lambda y, t: network(y[..., 0], t), x, key, codec=codec, **kwargs))(
          jax.random.PRNGKey(2))
  np.testing.assert_allclose(nelbo, md4_nelbo, rtol=1e-6)
  for key in ("loss_diffusion", "loss_recon", "loss_prior", "bits_per_token",
              "masked_fraction"):
    np.testing.assert_allclose(aux[key], md4_aux[key], rtol=1e-6)


# Sources of independent tokens with class probabilities p, each with a codec:
# toy: C = 4, l = 2, x in {0 = 00, 3 = 11} uniform (DESIGN.md's warning);
# base3: C = 9, l = 2 (b = 3), mass on 00, 01, 11, 12, 21, sharing digits;
# binary: C = 6, b = 2, l = 3, shuffled (codes 6 and 7 encode nothing).
SOURCES = {
    "toy": (lambda: prime.Codec(4, 2), [0.5, 0, 0, 0.5]),
    "base3": (lambda: prime.Codec(9, 2), [0.3, 0.2, 0, 0, 0.25, 0.15, 0, 0.1, 0]),
    "binary": (lambda: prime.Codec(6, binary=True, shuffle_seed=0),
               [0.05, 0.3, 0.1, 0.25, 0.2, 0.1]),
}
LENGTH, NUM_BATCHES, BATCH_SIZE = 8, 16, 2048


def _oracle(probs):
  """The exact posterior of an independent source: log p per position, whatever
  y is; carry-over does the conditioning."""
  log_p = jnp.log(jnp.asarray(probs, jnp.float32))
  return lambda y, t: jnp.broadcast_to(log_p, y.shape[:-1] + log_p.shape)


def _exact_expectations(codec, probs, sch, cont_time, timesteps):
  """E[NELBO] and E[surrogate] per token of the oracle, by enumeration.

  Sub-tokens are masked independently with probability 1 - alpha, so a mask
  pattern M has probability P_alpha(M) = (1 - alpha)^|M| alpha^(l - |M|).
  With H_M = E_x[sum_{j in M} -log mu^j(f(x)_j | f(x) off M)] and
  S_M = E_x[-log p(x | f(x) off M)] (M nonempty), the estimators' means are

    continuous: int_0^1 -w(t) sum_M P_alpha_t(M) H_M dt + recon
              = sum_M H_M int_{alpha_1}^{alpha_0} (1-a)^(|M|-1) a^(l-|M|) da + recon,
    discrete:   sum_{i=1}^T (alpha_s - alpha_t)/(1 - alpha_t) sum_M P_alpha_t(M) H_M
                + recon,

  with t = i/T, s = t - 1/T, recon + prior = l (1 - alpha_0 + alpha_1) log b,
  and S_M for H_M in the surrogate. Over the full range alpha in [0, 1] the
  continuous integral weights every H_M so that the sum telescopes to the
  entropy H(p) for any codec (random-order chain rule); the clamped ends
  move it by O(eps). On the toy, H_{00} = 2 ln 2 and H_M = 0 otherwise, so
  the NELBO is 2 ln 2 (1 - 2 eps) / 2 + 4 eps ln 2 = (1 + 2 eps) ln 2, and the
  surrogate (ln 2 / 2) (1 - 2 eps) + 4 eps ln 2, about half the entropy.
  """
  codes = codec.digit_table
  probs = np.asarray(probs, np.float64)
  length = codec.length
  alpha_0, alpha_1 = float(sch.alpha(0.0)), float(sch.alpha(1.0))
  if not cont_time:
    t = np.arange(1, timesteps + 1) / timesteps
    alpha_t = np.asarray(sch.alpha(jnp.asarray(t, jnp.float32)), np.float64)
    alpha_s = np.asarray(sch.alpha(jnp.asarray(t - 1 / timesteps, jnp.float32)),
                         np.float64)
  nelbo = surrogate = length * (1 - alpha_0 + alpha_1) * math.log(codec.base)
  for masked in itertools.product([False, True], repeat=length):
    num_masked = sum(masked)
    if num_masked == 0:
      continue
    masked = np.array(masked)
    h_m = s_m = 0.0
    for x in np.flatnonzero(probs):
      agrees = (codes[:, ~masked] == codes[x, ~masked]).all(axis=1)
      posterior = np.where(agrees, probs, 0.0)
      posterior /= posterior.sum()
      for j in np.flatnonzero(masked):
        h_m -= probs[x] * math.log(posterior[codes[:, j] == codes[x, j]].sum())
      s_m -= probs[x] * math.log(posterior[x])
    if cont_time:
      integrand = (np.polynomial.Polynomial([1, -1])**(num_masked - 1)
                   * np.polynomial.Polynomial([0, 1])**(length - num_masked)).integ()
      weight = integrand(alpha_0) - integrand(alpha_1)
    else:
      weight = np.sum((alpha_s - alpha_t) / (1 - alpha_t) * (1 - alpha_t)**num_masked
                      * alpha_t**(length - num_masked))
    nelbo += weight * h_m
    surrogate += weight * s_m
  return nelbo, surrogate


def _draw_source(probs, seed):
  return np.random.default_rng(seed).choice(len(probs), p=probs,
                                            size=(NUM_BATCHES, BATCH_SIZE, LENGTH))


def _batch_means(probs, codec, sch, **kwargs):
  """(Mean loss of each of N independent antithetic batches [N], one aux)."""
  x = _draw_source(probs, 1)
  oracle = _oracle(probs)

  def one_batch(args):
    nelbo, aux = prime.loss(oracle, args[0], args[1], codec=codec, schedule=sch,
                            **kwargs)
    return nelbo.mean(), aux["nelbo"].mean()

  return jax.jit(lambda x, key: jax.lax.map(
      one_batch, (x, jax.random.split(key, NUM_BATCHES))))(x, jax.random.PRNGKey(2))


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("schedule_name, cont_time", [("linear", True),
                                                      ("cosine", False)])
def test_oracle_nelbo_is_the_entropy(name, schedule_name, cont_time):
  make_codec, probs = SOURCES[name]
  codec, sch = make_codec(), schedule.get(schedule_name)
  entropy = float(stats.entropy(probs))
  exact, _ = _exact_expectations(codec, probs, sch, cont_time, timesteps=8)
  if cont_time:  # Only the clamped ends separate the bound from the entropy.
    assert abs(exact - entropy) < 1e-3 * entropy, (exact, entropy)
  if name == "toy" and cont_time:
    assert abs(exact - (1 + 2 * sch.eps) * math.log(2)) < 1e-6
  means, _ = _batch_means(probs, codec, sch, cont_time=cont_time, timesteps=8)
  estimate = float(means.mean()) / LENGTH
  standard_error = float(means.std(ddof=1)) / math.sqrt(NUM_BATCHES) / LENGTH
  assert standard_error < 0.02 * entropy  # The check has power.
  assert abs(estimate - exact) < 4 * standard_error + 1e-5, (estimate, exact,
                                                             standard_error)


@pytest.mark.parametrize("name", list(SOURCES))
def test_exact_oracle_nelbo_is_the_enumeration_and_never_below_the_entropy(name):
  """The estimator's mean over every t and sub-token mask (`tests.exact`, one
  position), with the exact posterior as network, equals the enumeration
  above and is never below the entropy, at every eps: without the prior term
  it is on base3 and binary (on the toy it is then the entropy exactly)."""
  make_codec, probs = SOURCES[name]
  codec = make_codec()
  probs = np.asarray(probs)
  support = np.flatnonzero(probs)
  entropy = float(stats.entropy(probs))
  oracle = _oracle(probs)
  for (schedule_name, cont_time), eps in itertools.product(
      [("linear", True), ("poly0.5", True), ("cosine", False)], [1e-4, 0.1, 0.3]):
    sch = schedule.get(schedule_name, eps=eps)
    loss_fn = lambda x, y, t: prime.loss_given_state(
        oracle, x, y, t, codec=codec, schedule=sch, cont_time=cont_time, timesteps=8)[0]
    times = exact.time_quadrature() if cont_time else exact.discrete_times(8)
    nelbo = exact.expected_loss(loss_fn, support[:, None], probs[support],
                                codec.encode(support[:, None]), codec.mask_id, sch, *times)
    enumerated, _ = _exact_expectations(codec, probs, sch, cont_time, timesteps=8)
    np.testing.assert_allclose(nelbo, enumerated, rtol=2e-6,
                               err_msg=f"{schedule_name} eps={eps}")
    assert nelbo >= entropy * (1 - 1e-6), (schedule_name, eps, nelbo, entropy)
    prior = float(diffusion.prior(sch, codec.length, codec.base))
    if cont_time and name != "toy":  # The check has power: without its prior the bound fails.
      assert nelbo - prior < entropy * (1 - 1e-6), (schedule_name, eps, nelbo - prior)


@pytest.mark.parametrize("name", list(SOURCES))
def test_joint_surrogate_falls_below_the_entropy(name):
  make_codec, probs = SOURCES[name]
  codec, sch = make_codec(), schedule.get("linear")
  entropy = float(stats.entropy(probs))
  exact_nelbo, exact_surrogate = _exact_expectations(codec, probs, sch, True, 1)
  surrogates, nelbos = _batch_means(probs, codec, sch, objective="joint")
  estimate = float(surrogates.mean()) / LENGTH
  standard_error = float(surrogates.std(ddof=1)) / math.sqrt(NUM_BATCHES) / LENGTH
  assert abs(estimate - exact_surrogate) < 4 * standard_error + 1e-5
  # Exactly 0.50, 0.88 and 0.93 of the entropy on toy, base3 and binary.
  assert exact_surrogate < 0.95 * entropy
  assert estimate < entropy - 3 * standard_error
  if name == "toy":
    np.testing.assert_allclose(exact_surrogate, math.log(2) / 2, rtol=1e-3)
  # aux still reports the valid NELBO.
  nelbo_estimate = float(nelbos.mean()) / LENGTH
  nelbo_error = float(nelbos.std(ddof=1)) / math.sqrt(NUM_BATCHES) / LENGTH
  assert abs(nelbo_estimate - exact_nelbo) < 4 * nelbo_error + 1e-5


def test_aux_reports_bits_per_original_token():
  codec = prime.Codec(27, binary=True)
  uniform = lambda y, t: jnp.zeros(y.shape[:-1] + (27,))
  x = np.random.default_rng(0).integers(0, 27, (4096, 16))
  loss_fn = jax.jit(lambda key: [prime.loss(
      uniform, x, key, codec=codec, schedule=schedule.get("linear"),
      objective=objective) for objective in ("nelbo", "joint")])
  (nelbo, aux), (_, joint_aux) = loss_fn(jax.random.PRNGKey(1))
  assert nelbo.shape == (4096,)
  # objective="joint" reports the same valid NELBO on the same draws.
  for key, value in aux.items():
    np.testing.assert_allclose(joint_aux[key], value, rtol=1e-6)
  np.testing.assert_allclose(aux["bits_per_token"], nelbo.mean() / (16 * math.log(2)),
                             rtol=1e-6)
  np.testing.assert_allclose(aux["nelbo"], nelbo, rtol=1e-6)
  np.testing.assert_allclose(aux["loss_recon"], 16 * 5 * 1e-4 * math.log(2), rtol=1e-3)
  np.testing.assert_allclose(aux["loss_prior"], 16 * 5 * 1e-4 * math.log(2), rtol=1e-3)
  # A uniform network codes each token with log C nats whatever the order.
  np.testing.assert_allclose(aux["bits_per_token"], math.log2(27), rtol=0.03)


@pytest.mark.parametrize("objective", prime.OBJECTIVES)
def test_loss_jits_and_differentiates(objective):
  codec = prime.Codec(11, 2, shuffle_seed=0)
  x = np.random.default_rng(0).integers(0, 11, (32, 6))
  table = jnp.zeros((codec.length, codec.base + 1, 11))

  def mean_loss(table, key):
    network = lambda y, t: sum(table[j][y[..., j]] for j in range(codec.length))
    return prime.loss(network, x, key, codec=codec, schedule=schedule.get("cosine"),
                      objective=objective)[0].mean()

  grads = jax.jit(jax.grad(mean_loss))(table, jax.random.PRNGKey(1))
  assert jnp.isfinite(grads).all() and jnp.abs(grads).sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "elbo"}, "objective"),
    ({"codec": 11}, "codec"),
    ({"x": np.array([[0, 11]])}, "outside \\[0, 11\\)"),
    ({"cont_time": False, "timesteps": 0}, "timesteps"),
    ({"predict_fn": lambda y, t: jnp.zeros(y.shape)}, "logits of shape"),
])
def test_bad_loss_input_is_named(kwargs, match):
  codec = prime.Codec(11, 2)
  arguments = {"predict_fn": lambda y, t: jnp.zeros(y.shape[:-1] + (11,)),
               "x": jnp.zeros((2, 4), jnp.int32), "codec": codec,
               "schedule": schedule.get("linear"), **kwargs}
  with pytest.raises(ValueError, match=match):
    prime.loss(arguments.pop("predict_fn"), jnp.asarray(arguments.pop("x")),
               jax.random.PRNGKey(0), **arguments)


# ---------------------------------------------------------------- sampler


def _sample_codes(predict_fn, codec, shape, steps, seed=0, **kwargs):
  """The sampler's final sub-token states [*shape, l]: its last frame, before decoding."""
  return np.asarray(_sample(predict_fn, codec, shape, steps, seed, num_frames=2,
                            **kwargs).frames[-1])


def _sample(predict_fn, codec, shape, steps, seed=0, **kwargs):
  space = prime.SubTokens(codec, schedule.get("cosine"))
  return jax.jit(lambda key: samplers.sample(
      "ancestral", predict_fn, key, space, shape=shape, steps=steps, **kwargs))(
          jax.random.PRNGKey(seed))


@pytest.mark.parametrize("name, steps, grid", [("toy", 6, "uniform"),
                                               ("base3", 6, "cosine"),
                                               ("binary", 10, "uniform"),
                                               ("binary", 1, "cosine")])
def test_sampler_reproduces_the_source(name, steps, grid):
  make_codec, probs = SOURCES[name]
  codec = make_codec()
  codes = _sample_codes(_oracle(probs), codec, (1000, LENGTH), steps, grid=grid)
  assert codes.shape == (1000, LENGTH, codec.length) and codes.dtype == np.int32
  tokens = codec.decode(codes)  # Raises on a code that encodes no class.
  counts = np.bincount(tokens.ravel(), minlength=codec.num_classes)
  probs = np.asarray(probs)
  assert counts[probs == 0].sum() == 0
  expected = probs[probs > 0] * tokens.size
  chi_square = ((counts[probs > 0] - expected)**2 / expected).sum()
  threshold = stats.chi2.ppf(1 - FALSE_ALARM, df=(probs > 0).sum() - 1)
  assert chi_square < threshold, (counts, expected)


@pytest.mark.parametrize("num_classes", [5, 27])
def test_sampler_never_yields_an_undecodable_code(num_classes):
  """A network whose prediction moves with every revealed sub-token, binary codes
  with invalid strings: without carry-over, digits revealed from different
  draws would mix into codes of no class."""
  codec = prime.Codec(num_classes, binary=True, shuffle_seed=1)
  tables = jnp.asarray(3 * np.random.default_rng(num_classes).normal(
      size=(codec.length, codec.base + 1, num_classes)), jnp.float32)

  def network(y, t):
    neighbour = jnp.roll(y, 1, axis=1)
    return sum(tables[j][y[..., j]] + tables[j][neighbour[..., j]] * t[:, None, None]
               for j in range(codec.length))

  codes = _sample_codes(network, codec, (256, 16), steps=12)
  assert codec.is_valid(codes).all()


def test_tiny_top_p_always_takes_the_most_likely_class():
  """The nucleus of p(. | y_t) is its argmax, class 0 (p = 0.3) at the start,
  and still allowed and most likely after every reveal."""
  make_codec, probs = SOURCES["base3"]
  codec = make_codec()
  tokens = prime.sample(_oracle(probs), jax.random.PRNGKey(0), shape=(64, LENGTH),
                        codec=codec, schedule=schedule.get("cosine"), steps=5,
                        top_p=1e-6)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, 0)


def _copy_oracle(probs, codec):
  """Exact posterior of a source whose L positions all copy one class c ~ p:
  p(c | y) ~ p(c) prod_i [f(c) agrees with y^i], the same at every position."""
  log_p = jnp.log(jnp.asarray(probs, jnp.float32))

  def network(y, t):
    agrees = prime.allowed_classes(y, codec).all(axis=1, keepdims=True)
    logits = jnp.where(agrees, log_p, -jnp.inf)
    return jnp.broadcast_to(logits, y.shape[:-1] + log_p.shape)

  return network


@pytest.mark.parametrize("prefix_length", [1, LENGTH])
def test_prefix_is_kept_and_conditions_the_rest(prefix_length):
  make_codec, probs = SOURCES["binary"]
  codec = make_codec()
  first = np.random.default_rng(4).choice(len(probs), p=probs, size=(128, 1))
  prefix = np.broadcast_to(first, (128, prefix_length)).astype(np.int32)
  codes = _sample_codes(_copy_oracle(probs, codec), codec, (128, LENGTH), 4,
                        prefix=prefix)
  tokens = codec.decode(codes)
  # Copies of the first token: the prefix fixes every position.
  np.testing.assert_array_equal(tokens, np.broadcast_to(first, tokens.shape))


def test_reuse_outputs_gives_identical_samples_with_fewer_network_calls():
  """For a network that reads y but not t, reusing its output after a step
  that revealed no sub-token changes no sample; the reported NFE counts the
  calls that ran. A network that reads t is refused."""
  codec = prime.Codec(27, 2, shuffle_seed=0)
  tables = jnp.asarray(np.random.default_rng(5).normal(
      size=(codec.length, codec.base + 1, 27)), jnp.float32)
  calls = []

  def network(y, t):
    del t
    jax.debug.callback(lambda: calls.append(1))
    neighbour = jnp.roll(y, 1, axis=1)
    return sum(tables[j][y[..., j]] + tables[j][neighbour[..., j]]
               for j in range(codec.length))

  outputs = {}
  for reuse in (False, True):
    calls.clear()
    drawn = _sample(network, codec, (4, 6), 200, seed=6, top_p=0.95, reuse_outputs=reuse)
    outputs[reuse] = np.asarray(drawn.tokens), int(drawn.nfe)
    assert len(calls) == int(drawn.nfe)
  np.testing.assert_array_equal(outputs[False][0], outputs[True][0])
  assert outputs[False][1] == 200
  # 48 sub-tokens: at most 48 steps reveal one, so at most 49 calls.
  assert outputs[True][1] <= 4 * 6 * codec.length + 1
  tokens = prime.sample(network, jax.random.PRNGKey(6), shape=(4, 6), codec=codec,
                        schedule=schedule.get("cosine"), steps=200, top_p=0.95,
                        reuse_outputs=True)
  np.testing.assert_array_equal(tokens, outputs[True][0])
  with pytest.raises(ValueError, match="reads t"):
    prime.sample(lambda y, t: network(y, t) * t[:, None, None], jax.random.PRNGKey(6),
                 shape=(4, 6), codec=codec, schedule=schedule.get("cosine"), steps=4,
                 reuse_outputs=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p"),
    ({"steps": 0}, "steps"),
    ({"grid": "log"}, "grid"),
    ({"shape": (4,)}, "shape"),
    ({"codec": 5}, "codec"),
    ({"prefix": np.zeros((4, 9), np.int32)}, "prefix has 9 positions"),
    ({"prefix": np.full((4, 2), 11, np.int32)}, "prefix has token ids"),
    ({"prefix": np.zeros((3, 2), np.int32)}, "prefix must have shape"),
    ({"predict_fn": lambda y, t: jnp.zeros(y.shape)}, "logits of shape"),
])
def test_bad_sampler_input_is_named(kwargs, match):
  arguments = {"predict_fn": lambda y, t: jnp.zeros(y.shape[:-1] + (11,)),
               "shape": (4, 8), "codec": prime.Codec(11, 2),
               "schedule": schedule.get("linear"), "steps": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    prime.sample(arguments.pop("predict_fn"), jax.random.PRNGKey(0), **arguments)
