"""ReMDM (Wang et al., 2025): ancestral steps that may remask revealed tokens.

A revealed token is remasked with probability sigma_t ("cap", "rescale" or
"loop" strategies, `remdm_schedule`), and a masked one revealed so that the
forward marginals stay 1 - alpha; eta = 0 is the ancestral sampler. Given
positions are never remasked; positions masked after the last step take the
most likely value.
"""

import jax
import jax.numpy as jnp
import numpy as np

from md4 import draws
from md4 import samplers
from md4 import schedule as schedule_lib
from md4.samplers import engine

Array = jnp.ndarray

STRATEGIES = ("cap", "rescale", "loop")


def remdm_schedule(sch: schedule_lib.Schedule, steps: int, grid: str, strategy: str,
                   eta: float, t_on: float, t_off: float,
                   alpha_on: float) -> tuple[np.ndarray, ...]:
  """ReMDM's steps (Wang et al., 2025): (alpha_t, alpha_s, sigma, t) float64 [T] each.

  Step i goes from alpha_t to alpha_s >= alpha_t; a revealed token is
  remasked with probability sigma <= sigma_max = min(1, (1 - alpha_s) /
  alpha_t), a masked one revealed with probability (alpha_s - (1 - sigma)
  alpha_t) / (1 - alpha_t), which keeps the forward marginals 1 - alpha;
  the network sees time t. On the grid t_i:
    cap      alpha = sch.alpha(t_i), sigma = min(eta, sigma_max)
    rescale  alpha = sch.alpha(t_i), sigma = eta sigma_max
    loop     alpha rises linearly to alpha_on over [t_on, 1], stays there on
             [t_off, t_on] while sigma = eta remasks, then rises to 1 on
             [0, t_off] (clamped by sch.eps); t is where sch masks 1 - alpha.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"remdm strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"remdm eta must be in [0, 1], got {eta}")
  with jax.ensure_compile_time_eval():  # Concrete under jit: the steps are constants.
    return _remdm_steps(sch, engine.time_grid(steps, grid).astype(np.float64), strategy, eta, t_on,
                        t_off, alpha_on)


def _remdm_steps(sch: schedule_lib.Schedule, times: np.ndarray, strategy: str, eta: float,
                 t_on: float, t_off: float, alpha_on: float) -> tuple[np.ndarray, ...]:
  if strategy == "loop":
    if not (0.0 <= t_off < t_on <= 1.0 and 0.0 < alpha_on < 1.0):
      raise ValueError(f"remdm loop needs 0 <= t_off < t_on <= 1 and 0 < alpha_on < 1, got "
                       f"t_off={t_off}, t_on={t_on}, alpha_on={alpha_on}")
    if eta > (1.0 - alpha_on) / alpha_on:
      raise ValueError(f"remdm loop: eta={eta} exceeds (1 - alpha_on) / alpha_on = "
                       f"{(1 - alpha_on) / alpha_on:.4g}, the most that keeps the marginals")
    raw = np.where(times > t_on, alpha_on * (1.0 - times) / (1.0 - t_on),
                   np.where(times > t_off, alpha_on,
                            1.0 - (1.0 - alpha_on) * times / max(t_off, 1e-12)))
    alpha = (1.0 - 2.0 * sch.eps) * raw + sch.eps
    network_times = np.asarray(engine.time_at_mask_prob(sch, 1.0 - alpha[:-1]), np.float64)
  else:
    alpha = np.asarray(sch.alpha(jnp.asarray(times)), np.float64)
    network_times = times[:-1]
  alpha_t, alpha_s = alpha[:-1], alpha[1:]
  sigma_max = np.minimum(1.0, (1.0 - alpha_s) / alpha_t)
  if strategy == "cap":
    sigma = np.minimum(eta, sigma_max)
  elif strategy == "rescale":
    sigma = eta * sigma_max
  else:
    looping = (times[:-1] <= t_on) & (times[:-1] > t_off)
    sigma = np.where(looping, np.minimum(eta, sigma_max), 0.0)
  return alpha_t, alpha_s, sigma, network_times


def run(start: engine.Start, rng: Array, *, strategy: str, eta: float, t_on: float,
        t_off: float, alpha_on: float) -> engine.Samples:
  """T = steps steps of `remdm_schedule` from start (a space of tokens that remask)."""
  space, steps, mask_id = start.space, start.steps, start.space.mask_id
  alpha_t, alpha_s, sigma, network_times = remdm_schedule(space.schedule, steps, start.grid,
                                                          strategy, eta, t_on, t_off, alpha_on)
  reveal_prob = jnp.asarray(np.clip((alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t),
                                    0.0, 1.0), jnp.float32)
  remask_prob = jnp.asarray(sigma, jnp.float32)
  network_times = jnp.asarray(network_times, jnp.float32)
  shape = start.given.shape

  def step(i: Array, carry: engine.Carry) -> engine.Carry:
    z = carry.state
    logits, nfe = engine.network_output(carry, lambda z: start.call_network(
        z, jnp.full((shape[0],), network_times[i])), start.reuse_outputs)
    rng_value, rng_reveal, rng_remask = _split(jax.random.fold_in(rng, i))
    values = draws.categorical(rng_value, engine.top_p_log_probs(logits, start.top_p))
    reveal = draws.bernoulli(rng_reveal, reveal_prob[i], shape)
    remask = draws.bernoulli(rng_remask, remask_prob[i], shape) & ~start.given
    z_next = jnp.where(z == mask_id, jnp.where(reveal, values, mask_id),
                       jnp.where(remask, mask_id, z))
    z_next = jnp.where((i == steps - 1) & (z_next == mask_id),
                       jnp.argmax(logits, axis=-1).astype(jnp.int32), z_next)
    return engine.advance(z, z_next, logits, nfe, mask_id, start.reuse_outputs)

  init = engine.initial_carry(start.state, start.logits_shape, mask_id, start.reuse_outputs)
  return start.finish(jax.lax.fori_loop(0, steps, step, init))


def _split(rng: Array) -> tuple[Array, Array, Array]:
  """(value, reveal, remask) keys; the first two as the ancestral sampler splits its draw."""
  rng_draw, rng_remask = jax.random.split(rng)
  rng_value, rng_reveal = jax.random.split(rng_draw)
  return rng_value, rng_reveal, rng_remask


# Defaults by measurement (docs/sampling.md, "Default sampler options").
SAMPLER = samplers.register(samplers.Sampler(
    "remdm", run, {"strategy": "rescale", "eta": 0.04, "t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9},
    needs=frozenset({"one_schedule", "remasking"})))
