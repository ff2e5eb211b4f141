"""Learnable per-value exponents w = softplus(phi) [V], e.g. for GenMD4's schedules.

The module owns only the parameter; what the exponents mean lives with the
math (`md4.genmd4`). The parameter `phi` carries the logical axis "vocab".
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def inverse_softplus(y: float) -> float:
  """phi with softplus(phi) = y > 0, stable for large and small y."""
  return y + math.log(-math.expm1(-y))


class LearnedPolySchedule(nn.Module):
  """Returns the exponents w [V] > 0, initialised to `init_power` everywhere."""

  vocab_size: int
  init_power: float = 1.0

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    if (isinstance(self.vocab_size, bool) or
        not isinstance(self.vocab_size, (int, np.integer)) or self.vocab_size < 1):
      raise ValueError(f"vocab_size must be a positive int, got {self.vocab_size!r}")
    if (isinstance(self.init_power, bool) or
        not isinstance(self.init_power, (int, float)) or
        not 0.0 < self.init_power < math.inf):
      raise ValueError(f"init_power must be a positive number, got {self.init_power!r}")
    phi = self.param(
        "phi",
        nn.with_logical_partitioning(
            nn.initializers.constant(inverse_softplus(float(self.init_power))),
            ("vocab",)),
        (self.vocab_size,), jnp.float32)
    return jax.nn.softplus(phi)
