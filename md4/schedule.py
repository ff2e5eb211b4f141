"""Masking schedules alpha_t on t in [0, 1], pure functions of t.

alpha_t is the probability that a token is still unmasked at time t. Every
schedule falls from alpha_0 ~ 1 to alpha_1 ~ 0 and is clamped as
alpha <- (1 - 2 eps) alpha + eps so that neither end is exactly 0 or 1.

    linear      1 - t
    cosine      1 - cos(pi/2 (1 - t))
    poly<k>     1 - t^k            (any positive float k: poly2, poly0.5)
    geometric   exp(-beta_min^(1-t) beta_max^t), beta_min = 1e-5, beta_max = 20
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp

Array = jnp.ndarray

BETA_MIN = 1e-5
BETA_MAX = 20.0
NAMES = ("linear", "cosine", "poly<k>", "geometric")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A clamped masking schedule; all methods take t of any shape."""

  name: str
  raw_alpha: Callable[[Array], Array]
  raw_dalpha: Callable[[Array], Array]
  eps: float = 1e-4

  def alpha(self, t: Array) -> Array:
    """Probability of a token being unmasked at time t."""
    return (1.0 - 2.0 * self.eps) * self.raw_alpha(t) + self.eps

  def dalpha(self, t: Array) -> Array:
    """d alpha / dt (<= 0)."""
    return (1.0 - 2.0 * self.eps) * self.raw_dalpha(t)

  def weight(self, t: Array) -> Array:
    """w(t) = alpha'(t) / (1 - alpha(t)) (<= 0), the NELBO's time weight."""
    return self.dalpha(t) / (1.0 - self.alpha(t))


def _linear() -> tuple[Callable, Callable]:
  return (lambda t: 1.0 - t), (lambda t: -jnp.ones_like(t))


def _cosine() -> tuple[Callable, Callable]:
  half_pi = math.pi / 2
  return (lambda t: 1.0 - jnp.cos(half_pi * (1.0 - t)),
          lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)))


def _poly(power: float) -> tuple[Callable, Callable]:
  return (lambda t: 1.0 - t**power,
          lambda t: -power * t**(power - 1.0))


def _geometric() -> tuple[Callable, Callable]:
  log_ratio = math.log(BETA_MAX) - math.log(BETA_MIN)

  def rate(t):
    return BETA_MIN**(1.0 - t) * BETA_MAX**t

  return (lambda t: jnp.exp(-rate(t)),
          lambda t: -jnp.exp(-rate(t)) * rate(t) * log_ratio)


def get(name: str, eps: float = 1e-4) -> Schedule:
  """Returns the schedule called `name` (see module docstring)."""
  if name == "linear":
    fns = _linear()
  elif name == "cosine":
    fns = _cosine()
  elif name == "geometric":
    fns = _geometric()
  elif name.startswith("poly"):
    try:
      power = float(name[len("poly"):])
    except ValueError:
      power = -1.0
    if not power > 0 or not math.isfinite(power):
      raise ValueError(
          f"schedule {name!r}: poly<k> needs a positive number k, e.g. "
          f"'poly2' or 'poly0.5'; valid schedules: {', '.join(NAMES)}")
    fns = _poly(power)
  else:
    raise ValueError(
        f"unknown schedule {name!r}; valid schedules: {', '.join(NAMES)}")
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"schedule eps must be in [0, 0.5), got {eps}")
  return Schedule(name, fns[0], fns[1], eps)
