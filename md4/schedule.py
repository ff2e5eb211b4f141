"""Masking schedules alpha_t on t in [0, 1], pure functions of t.

alpha_t is the probability that a token is still unmasked at time t. Every
schedule falls from alpha_0 ~ 1 to alpha_1 ~ 0 and is clamped as
alpha <- (1 - 2 eps) alpha + eps so that neither end is exactly 0 or 1.

    linear      1 - t
    cosine      1 - cos(pi/2 (1 - t))
    poly<k>     1 - t^k            (any positive float k: poly2, poly0.5)
    geometric   exp(-beta_min^(1-t) beta_max^t), beta_min = 1e-5, beta_max = 20

Each schedule computes alpha and 1 - alpha apart, each without cancellation
where it is small (alpha near t = 1, 1 - alpha near t = 0), so that reveal
probabilities and weights keep their relative precision at both ends. All
are finite on [0, 1] except dalpha of poly<k> with k < 1 at t = 0 exactly,
which the NELBO's time draw never reaches (`diffusion.sample_times`). That
draw's smallest time is 2^-65 / B: below it poly<k> spends (2^-65 / B)^k of
alpha's range, which the estimate misses (2e-10 at k = 0.5, 1e-5 at
k = 0.25, 1e-2 at k = 0.1), so NELBOs need k >= 0.5 to be exact.
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
  """A clamped masking schedule; all methods take t of any shape.

  raw_alpha, raw_mask_prob = 1 - raw_alpha and raw_dalpha are the schedule
  before clamping.
  """

  name: str
  raw_alpha: Callable[[Array], Array]
  raw_mask_prob: Callable[[Array], Array]
  raw_dalpha: Callable[[Array], Array]
  eps: float = 1e-4

  def alpha(self, t: Array) -> Array:
    """Probability of a token being unmasked at time t."""
    return (1.0 - 2.0 * self.eps) * self.raw_alpha(t) + self.eps

  def mask_prob(self, t: Array) -> Array:
    """1 - alpha(t), the probability of a token being masked at time t."""
    return (1.0 - 2.0 * self.eps) * self.raw_mask_prob(t) + self.eps

  def alpha_drop(self, s: Array, t: Array) -> Array:
    """alpha(s) - alpha(t) for s <= t, from alpha where it is below 1/2, else
    from 1 - alpha: the difference of the smaller, more precise pair."""
    alpha_t = self.raw_alpha(t)
    drop = jnp.where(alpha_t < 0.5, self.raw_alpha(s) - alpha_t,
                     self.raw_mask_prob(t) - self.raw_mask_prob(s))
    return (1.0 - 2.0 * self.eps) * drop

  def dalpha(self, t: Array) -> Array:
    """d alpha / dt (<= 0)."""
    return (1.0 - 2.0 * self.eps) * self.raw_dalpha(t)

  def weight(self, t: Array) -> Array:
    """w(t) = alpha'(t) / (1 - alpha(t)) (<= 0), the NELBO's time weight."""
    # With eps = 0 both can underflow (poly2 below t = 1e-19), where no token is masked.
    return self.dalpha(t) / jnp.maximum(self.mask_prob(t), jnp.finfo(jnp.float32).tiny)


Functions = tuple[Callable[[Array], Array], Callable[[Array], Array], Callable[[Array], Array]]


def _linear() -> Functions:
  return (lambda t: 1.0 - t), (lambda t: t), (lambda t: -jnp.ones_like(t))


def _cosine() -> Functions:
  # 1 - cos(x) = 2 sin^2(x / 2) and cos(pi/2 (1 - t)) = sin(pi/2 t): no cancellation.
  return (lambda t: 2.0 * jnp.sin(math.pi / 4 * (1.0 - t))**2,
          lambda t: jnp.sin(math.pi / 2 * t),
          lambda t: -math.pi / 2 * jnp.sin(math.pi / 2 * (1.0 - t)))


def _poly(power: float) -> Functions:
  # 1 - t^k = -expm1(k log t) keeps its precision near t = 1.
  return (lambda t: -jnp.expm1(power * jnp.log(t)),
          lambda t: t**power,
          lambda t: -power * t**(power - 1.0))


def _geometric() -> Functions:
  log_ratio = math.log(BETA_MAX) - math.log(BETA_MIN)

  def rate(t):
    return BETA_MIN**(1.0 - t) * BETA_MAX**t

  return (lambda t: jnp.exp(-rate(t)),
          lambda t: -jnp.expm1(-rate(t)),
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
  return Schedule(name, *fns, eps=eps)
