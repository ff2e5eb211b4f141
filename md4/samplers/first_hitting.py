"""First-hitting sampling (Zheng et al., 2024): the exact reverse process of a
network that ignores t, one uniformly chosen masked entry per network call, at
the time its reveal first happens."""

import jax
import jax.numpy as jnp

from md4 import draws
from md4 import samplers
from md4.samplers import engine

Array = jnp.ndarray


def run(start: engine.Start, rng: Array) -> engine.Samples:
  """The first-hitting sampler over the masked entries of start.state.

  With n entries of a row masked at time t, the first of them is revealed at
  tau with mask_prob(tau) = mask_prob(t) u^(1/n), u ~ U(0, 1); it is a
  uniformly chosen masked entry, set to its share of a draw x_hat ~
  softmax(call_network(state, tau)). For a network that ignores t this is
  the model's reverse process exactly, for any n: one network call per
  revealed entry, as many calls as the most masked row has entries.
  """
  space, top_p, call_network = start.space, start.top_p, start.call_network
  state, mask_id, schedule, entries = start.state, space.mask_id, space.schedule, space.entries
  logits_shape = start.logits_shape
  batch_size = state.shape[0]

  def step(loop: tuple[engine.Carry, Array]) -> tuple[engine.Carry, Array]:
    carry, t = loop
    is_masked = (carry.state == mask_id).reshape(batch_size, -1)
    num_masked = jnp.sum(is_masked, axis=1)
    rng_time, rng_value, rng_choice = jax.random.split(jax.random.fold_in(rng, carry.nfe), 3)
    u = draws.uniform(rng_time, (batch_size,))
    first_mask_prob = schedule.mask_prob(t) * u**(1.0 / jnp.maximum(num_masked, 1))
    tau = jnp.where(num_masked > 0, engine.time_at_mask_prob(schedule, first_mask_prob), t)
    logits = call_network(carry.state, tau)
    values = draws.categorical(rng_value, engine.top_p_log_probs(logits, top_p))
    choice = jnp.where(is_masked, draws.uniform(rng_choice, is_masked.shape), -1.0)
    hit = jax.nn.one_hot(jnp.argmax(choice, axis=1), is_masked.shape[1], dtype=jnp.bool_)
    hit = (hit & is_masked).reshape(carry.state.shape)
    next_state = jnp.where(hit, entries(values), carry.state)
    return engine.Carry(next_state, None, carry.nfe + 1, jnp.bool_(True)), tau

  init = engine.initial_carry(state, logits_shape, mask_id, False)
  final, _ = jax.lax.while_loop(lambda loop: jnp.any(loop[0].state == mask_id), step,
                                (init, jnp.ones((batch_size,), jnp.float32)))
  return start.finish(final)


def network_calls(steps: int, entries: int) -> int:
  """One call per entry of an example."""
  del steps
  return entries


SAMPLER = samplers.register(samplers.Sampler(
    "first_hitting", run, needs=frozenset({"one_schedule"}), network_calls=network_calls))
