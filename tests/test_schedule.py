"""Schedules: clamping, derivatives, signs, names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import schedule

NAMES = ["linear", "cosine", "poly2", "poly3", "poly0.5", "geometric"]


@pytest.mark.parametrize("name", NAMES)
def test_dalpha_is_the_derivative_of_alpha(name):
  sch = schedule.get(name)
  t = jnp.linspace(0.01, 0.99, 41)
  autodiff = jax.vmap(jax.grad(sch.alpha))(t)
  np.testing.assert_allclose(sch.dalpha(t), autodiff, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_nonpositive_and_alpha_is_clamped(name):
  sch = schedule.get(name)
  t = jnp.linspace(1e-3, 1 - 1e-3, 999)
  assert (sch.weight(t) <= 0).all()
  alpha = sch.alpha(jnp.array([0.0, 1.0]))
  # Exact end points (1 - eps, eps) up to the schedules' own tiny offsets (geometric).
  np.testing.assert_allclose(alpha, [1 - sch.eps, sch.eps], rtol=1e-4, atol=1e-8)
  assert (jnp.diff(sch.alpha(t)) <= 0).all()


def test_poly_power_is_parsed():
  np.testing.assert_allclose(schedule.get("poly3").alpha(jnp.float32(0.5)),
                             (1 - 2e-4) * (1 - 0.125) + 1e-4, rtol=1e-6)


@pytest.mark.parametrize("name", ["quadratic", "poly", "poly-1", "polyabc", "poly0"])
def test_unknown_name_lists_the_valid_ones(name):
  with pytest.raises(ValueError, match="linear, cosine, poly<k>, geometric"):
    schedule.get(name)
