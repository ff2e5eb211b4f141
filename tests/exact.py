"""Exact expectations of the NELBO estimators, for the one-sided checks.

An estimator's value at a time t and a masked state z is deterministic
(`diffusion.loss_given_state`, `prime.loss_given_state`), so its mean is a
sum over the data, the mask patterns (each slot masked independently with
probability 1 - alpha_t) and the times: the T grid points i / T in discrete
time, a quadrature in continuous time. The quadrature is 8-point
Gauss-Legendre on panels of width 1/32, the first split at 2^-j down to
2^-60, on each of which alpha' is smooth even for poly<k> with k < 1 (whose
alpha' ~ t^(k-1) is not at 0) and geometric (a peak of width 0.07): it
integrates alpha' of every schedule to within 1e-10 (poly0.5: 5e-11), far
below the float32 arithmetic of the estimators (~1e-7).
"""

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from md4 import schedule as schedule_lib

NUM_PANELS, NUM_GRADED, NODES_PER_PANEL = 32, 60, 8


def time_quadrature() -> tuple[np.ndarray, np.ndarray]:
  """(times, weights) float64 [N] of the quadrature over t in (0, 1) above."""
  nodes, weights = np.polynomial.legendre.leggauss(NODES_PER_PANEL)
  edges = np.unique(np.concatenate([[0.0], 2.0**-np.arange(NUM_GRADED, 0, -1),
                                    np.arange(1, NUM_PANELS + 1) / NUM_PANELS]))
  low, width = edges[:-1, None], np.diff(edges)[:, None]
  return ((low + width * (nodes + 1) / 2).ravel(), (width * weights / 2).ravel())


def discrete_times(timesteps: int) -> tuple[np.ndarray, np.ndarray]:
  """(times i / T, weights 1 / T) float64 [T]: the discrete-time estimator's draw."""
  return np.arange(1, timesteps + 1) / timesteps, np.full(timesteps, 1 / timesteps)


def expected_loss(loss_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                  sequences: np.ndarray, probs: np.ndarray, codes: np.ndarray, mask_id: int,
                  sch: schedule_lib.Schedule, times: np.ndarray,
                  time_weights: np.ndarray) -> float:
  """sum_x p(x) sum_t w(t) sum_z q(z | x, t) loss_fn(x, z, t), float64.

  Args:
    loss_fn: (x [R, L], z [R, ...], t [R]) -> float32 [R], the estimate at
      given states and times.
    sequences: x [N, L], every sequence of nonzero probability.
    probs: p(x) [N].
    codes: the states' unmasked values [N, ...] (x itself, or its sub-tokens);
      every slot of a code is masked independently.
    mask_id: the id of a masked slot.
    sch: the schedule: a slot stays unmasked with probability alpha(t).
    times, time_weights: where and with what weight to evaluate [T].
  """
  slot_shape = codes.shape[1:]
  patterns = np.array(list(itertools.product([False, True], repeat=int(np.prod(slot_shape)))))
  patterns = patterns.reshape((-1,) + slot_shape)
  num_masked = patterns.reshape(len(patterns), -1).sum(axis=-1)
  num_slots = patterns[0].size
  t32 = jnp.asarray(times, jnp.float32)
  alpha = np.asarray(sch.alpha(t32), np.float64)
  mask_prob = np.asarray(sch.mask_prob(t32), np.float64)
  # q(pattern | t) [T, M].
  pattern_probs = (mask_prob[:, None]**num_masked * alpha[:, None]**(num_slots - num_masked))
  loss_fn = jax.jit(loss_fn)
  total = 0.0
  for x, p, code in zip(sequences, probs, codes):
    z = np.where(patterns, mask_id, code[None])
    rows_x = np.broadcast_to(x, (len(times), len(patterns)) + x.shape).reshape(-1, *x.shape)
    rows_z = np.broadcast_to(z, (len(times),) + z.shape).reshape(-1, *slot_shape)
    rows_t = np.repeat(t32, len(patterns))
    values = np.asarray(loss_fn(jnp.asarray(rows_x), jnp.asarray(rows_z), rows_t), np.float64)
    total += p * np.sum(time_weights[:, None] * pattern_probs * values.reshape(len(times), -1))
  return total
