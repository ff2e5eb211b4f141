"""Schedules: derivatives, clamping, precision at both ends, finiteness, names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import diffusion, schedule

NAMES = ["linear", "cosine", "poly2", "poly3", "poly0.5", "geometric"]
# Every t the NELBO's time draw can give: its smallest (draws.uniform's 2^-65
# over a batch of 2^20), 1 (by rounding), and a sweep between.
DRAWABLE_TIMES = np.concatenate([[2.0**-85, 2.0**-65, 2.0**-24, 1.0],
                                 np.linspace(1e-3, 1 - 1e-3, 99)]).astype(np.float32)


def _reference(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(alpha, 1 - alpha) before clamping, float64, from the module docstring's formulas."""
  t = t.astype(np.float64)
  if name == "linear":
    return 1 - t, t
  if name == "cosine":  # 1 - cos(x) = 2 sin^2(x / 2): float64 would cancel as well.
    return 2 * np.sin(np.pi / 4 * (1 - t))**2, np.cos(np.pi / 2 * (1 - t))
  if name == "geometric":
    rate = schedule.BETA_MIN**(1 - t) * schedule.BETA_MAX**t
    return np.exp(-rate), -np.expm1(-rate)
  power = float(name[len("poly"):])
  return -np.expm1(power * np.log(t)), t**power


@pytest.mark.parametrize("name", NAMES)
def test_dalpha_is_the_derivative_of_alpha(name):
  with jax.enable_x64(True):
    sch = schedule.get(name)
    t = jnp.linspace(0.01, 0.99, 41, dtype=jnp.float64)
    autodiff = jax.vmap(jax.grad(sch.alpha))(t)
    np.testing.assert_allclose(sch.dalpha(t), autodiff, rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_nonpositive_and_alpha_is_clamped(name):
  sch = schedule.get(name)
  t = jnp.linspace(1e-3, 1 - 1e-3, 999)
  assert (sch.weight(t) <= 0).all()
  alpha = sch.alpha(jnp.array([0.0, 1.0]))
  # Exact end points (1 - eps, eps) up to the schedules' own tiny offsets (geometric).
  np.testing.assert_allclose(alpha, [1 - sch.eps, sch.eps], rtol=1e-4, atol=1e-8)
  assert (jnp.diff(sch.alpha(t)) <= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_alpha_and_mask_prob_keep_relative_precision_at_both_ends(name):
  """float32 alpha near t = 1 and 1 - alpha near t = 0, where each is small,
  within a few ulps of float64 (geometric's exponent, up to 20, costs it a
  factor 20): 1 - cos(x) in float32 (the old cosine) is 12% off at x = 1e-3,
  1 - t^2 about 2% at t = 1 - 1e-6."""
  sch = schedule.get(name, eps=0.0)
  gaps = np.float32(2.0)**-np.arange(1, 24, dtype=np.float32)
  near_one = (1 - gaps).astype(np.float32)
  alpha, _ = _reference(name, near_one)
  _, mask_prob = _reference(name, gaps)
  np.testing.assert_allclose(sch.alpha(jnp.asarray(near_one)), alpha, rtol=5e-6)
  np.testing.assert_allclose(sch.mask_prob(jnp.asarray(gaps)), mask_prob, rtol=5e-6)
  t = np.linspace(0, 1, 101, dtype=np.float32)
  np.testing.assert_allclose(sch.alpha(t) + sch.mask_prob(t), 1.0, atol=3e-7)


@pytest.mark.parametrize("eps", [1e-4, 0.0])
@pytest.mark.parametrize("name", NAMES + ["poly0.01", "poly50"])
def test_every_schedule_is_finite_wherever_the_estimator_draws_t(name, eps):
  sch = schedule.get(name, eps=eps)
  t = jnp.asarray(DRAWABLE_TIMES)
  for value in (sch.alpha(t), sch.mask_prob(t), sch.dalpha(t), sch.weight(t),
                diffusion.time_weight(sch, t, cont_time=True, timesteps=1)):
    assert jnp.isfinite(value).all(), (name, t[~jnp.isfinite(value)])
  for timesteps in (1, 10, 1000):
    grid = jnp.arange(1, timesteps + 1) / timesteps
    weight = diffusion.time_weight(sch, grid, cont_time=False, timesteps=timesteps)
    assert jnp.isfinite(weight).all() and (weight >= 0).all()


def test_the_time_draw_never_gives_zero_and_has_no_grid():
  """Draws over many keys stay in (0, 1]. Below 2^-10 jax.random.uniform's
  grid of 2^-23 has 8192 values, so 1024 draws there would repeat some; these
  are all distinct (`draws.uniform`'s precision)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4096)
  for batch_size, antithetic in [(1, True), (7, True), (64, True), (3, False)]:
    t = np.asarray(jax.vmap(lambda key: diffusion.sample_times(
        key, batch_size, antithetic))(keys))
    assert t.min() > 0 and t.max() <= 1
  t = np.asarray(jax.jit(lambda key: diffusion.sample_times(key, 2**20, False))(
      jax.random.PRNGKey(1)))
  small = t[t < 2.0**-10]
  assert len(small) > 900 and len(np.unique(small)) == len(small)


def test_poly_power_is_parsed():
  np.testing.assert_allclose(schedule.get("poly3").alpha(jnp.float32(0.5)),
                             (1 - 2e-4) * (1 - 0.125) + 1e-4, rtol=1e-6)


@pytest.mark.parametrize("name", ["quadratic", "poly", "poly-1", "polyabc", "poly0"])
def test_unknown_name_lists_the_valid_ones(name):
  with pytest.raises(ValueError, match="linear, cosine, poly<k>, geometric"):
    schedule.get(name)


def test_reference_formulas_are_the_documented_ones():
  """The float64 references above agree with the docstring's plain formulas."""
  t = np.linspace(0.1, 0.9, 9)
  for name in NAMES:
    alpha, mask_prob = _reference(name, t)
    np.testing.assert_allclose(alpha + mask_prob, 1.0, rtol=1e-14)
  np.testing.assert_allclose(_reference("poly0.5", t)[0], 1 - np.sqrt(t), rtol=1e-14)
  np.testing.assert_allclose(_reference("cosine", t)[0], 1 - np.cos(np.pi / 2 * (1 - t)),
                             rtol=1e-14)
