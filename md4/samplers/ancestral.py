"""The ancestral sampler: the model's reverse process on a time grid.

Step i goes from t = t_i to s = t_{i+1}: every position draws a value x_hat
from softmax(logits) (or its renormalised top-p nucleus), and each of its
masked entries is revealed, as its share of x_hat, with the space's
probability (MD4 and Prime: (alpha_s - alpha_t) / (1 - alpha_t); GenMD4:
1 - (s / t)^{w_x_hat}). The reveal and the value are drawn apart, each at its
probability (`md4.draws`); revealed entries never change. Entries still
masked after the last step take the most likely value allowed, so a run costs
exactly T network evaluations, or fewer with output reuse.
"""

import jax
import jax.numpy as jnp
import numpy as np

from md4 import draws
from md4 import samplers
from md4.samplers import engine

Array = jnp.ndarray


def run(start: engine.Start, rng: Array) -> engine.Samples:
  """Samples, with start.num_frames snapshots of the state at evenly spaced steps
  (the first before any step, the last after all of them) when asked."""
  space, steps, mask_id = start.space, start.steps, start.space.mask_id
  times = jnp.asarray(engine.time_grid(steps, start.grid))
  batch_size = start.given.shape[0]
  entry_dims = (1,) * len(space.entry_shape)
  frame_steps = jnp.asarray(np.unique(np.linspace(0, steps, max(start.num_frames, 1)).round()),
                            jnp.int32)

  def fill(logits: Array, state: Array) -> Array:
    best = jnp.argmax(space.allowed_logits(logits, state), axis=-1).astype(jnp.int32)
    return jnp.where(state == mask_id, space.entries(best), state)

  def step(i: Array, carry: tuple[engine.Carry, Array | None]):
    loop, frames = carry
    state = loop.state
    logits, nfe = engine.network_output(
        loop, lambda state: start.call_network(state, jnp.full((batch_size,), times[i])),
        start.reuse_outputs)
    rng_value, rng_reveal = jax.random.split(jax.random.fold_in(rng, i))
    values = draws.categorical(rng_value, engine.top_p_log_probs(logits, start.top_p))
    prob = jnp.asarray(space.reveal_prob(times[i], times[i + 1], values))
    prob = prob.reshape(prob.shape + entry_dims) if prob.ndim else prob
    reveal = draws.bernoulli(rng_reveal, prob, state.shape)
    next_state = jnp.where((state == mask_id) & reveal, space.entries(values), state)
    next_state = jax.lax.cond(i == steps - 1, fill, lambda _, state: state, logits, next_state)
    if start.num_frames:
      index = jnp.minimum(jnp.searchsorted(frame_steps, i + 1), len(frame_steps) - 1)
      frames = jnp.where(frame_steps[index] == i + 1, frames.at[index].set(next_state), frames)
    return engine.advance(state, next_state, logits, nfe, mask_id, start.reuse_outputs), frames

  frames = (jnp.broadcast_to(start.state, (len(frame_steps),) + start.state.shape)
            if start.num_frames else None)
  init = engine.initial_carry(start.state, start.logits_shape, mask_id, start.reuse_outputs)
  final, frames = jax.lax.fori_loop(0, steps, step, (init, frames))
  return start.finish(final, frames)


SAMPLER = samplers.register(samplers.Sampler("ancestral", run, frames=True))
