"""Ordered unmasking: MaskGIT, LLaDA and semi-autoregressive blocks.

Each step draws a value x_hat for every masked position and reveals the k
with the highest score: "confidence" p(x_hat) (LLaDA's low-confidence
remasking), "maskgit" log p(x_hat) plus Gumbel noise annealed to 0, or
"random" (exact counts in random order); k follows the schedule on the grid,
or, with a threshold, every score above it (Fast-dLLM), so that the run can
end early. block_size decodes blocks left to right (semi-autoregressive,
LLaDA). A position is revealed whole: Prime's gets every sub-token of its
x_hat, drawn under carry-over. The network sees the t at which the schedule
masks the fraction of free positions still masked (`engine.time_at_mask_prob`).
"""

import functools
import math

import jax
import jax.numpy as jnp

from md4 import checks
from md4 import draws
from md4 import samplers
from md4.samplers import engine

Array = jnp.ndarray

ORDERS = ("confidence", "maskgit", "random")


def check_ordered_args(order: str, temperature: float, choice_temperature: float,
                       threshold: float, block_size: int, steps: int,
                       num_positions: int) -> int:
  """Raises ValueError naming a bad option of `run`; returns the number of blocks."""
  if order not in ORDERS:
    raise ValueError(f"order={order!r}; valid: {', '.join(ORDERS)}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: the most likely value), got {temperature}")
  if not choice_temperature >= 0:
    raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1] (0: none), got {threshold}")
  checks.positive_int(steps, "steps")
  if block_size == 0:
    return 1
  checks.positive_int(block_size, "block_size")
  num_blocks = -(-num_positions // block_size)
  if steps % num_blocks:
    raise ValueError(f"steps={steps} must be a multiple of the {num_blocks} blocks of "
                     f"block_size={block_size} over {num_positions} positions")
  return num_blocks


def run(start: engine.Start, rng: Array, *, order: str, temperature: float,
        choice_temperature: float, threshold: float, block_size: int) -> engine.Samples:
  """Ordered unmasking from start; nfe <= steps (fewer with a threshold or reuse).

  Args:
    start: the request; schedule, steps, grid: how many positions each step
      reveals: after step j of a block's steps // num_blocks, the block keeps
      floor(M mask_prob(t_{j+1}) / mask_prob(t_0)) of its M masked positions
      (t on the grid, mask_prob the space's schedule); with the linear
      schedule and the uniform grid, an even split (LLaDA). steps must be a
      multiple of the number of blocks.
    order: the score that ranks masked positions: "confidence" p(x_hat),
      "maskgit" log p(x_hat) + choice_temperature (1 - j / k) Gumbel, or
      "random".
    temperature: x_hat is drawn from softmax(logits / temperature); 0 takes
      the most likely value; 1 draws at the model's probabilities.
    choice_temperature: MaskGIT's noise on the ranking (order "maskgit").
    threshold: also reveal every position with p(x_hat) >= threshold (0:
      none); rows whose blocks finish early move on, and the loop ends when
      no position is masked, after at most `steps` network calls.
    block_size: decode blocks of this many positions (row-major) left to
      right, each to the end before the next; 0: one block.
  """
  space, steps, grid, top_p = start.space, start.steps, start.grid, start.top_p
  reuse_outputs, logits_shape, mask_id = start.reuse_outputs, start.logits_shape, space.mask_id
  schedule, call_network, masked, reveal = (space.schedule, start.call_network, start.masked,
                                            start.reveal)
  state = start.state
  batch_size = logits_shape[0]
  num_positions = math.prod(logits_shape[1:-1])
  num_blocks = check_ordered_args(order, temperature, choice_temperature, threshold,
                                  block_size, steps, num_positions)
  block_steps = steps // num_blocks
  block_of = jnp.arange(num_positions) // (block_size or num_positions)
  free = masked(state).reshape(batch_size, num_positions)
  # Masked positions of each block at its start: nothing before it touches them.
  block_masked = jnp.stack([jnp.sum(free & (block_of == b), axis=1) for b in range(num_blocks)],
                           axis=1)
  block_times = engine.time_grid(block_steps, grid)
  kept = jnp.asarray(schedule.mask_prob(block_times[1:]) / schedule.mask_prob(block_times[0]))
  kept = kept.at[-1].set(0.0)
  num_free = jnp.maximum(jnp.sum(free, axis=1), 1)
  rows = jnp.arange(batch_size)

  def step(loop: tuple[engine.Carry, Array, Array]) -> tuple[engine.Carry, Array, Array]:
    carry, iteration, block_step = loop
    is_masked = masked(carry.state).reshape(batch_size, num_positions)
    t = engine.time_at_mask_prob(
        schedule, schedule.mask_prob(1.0) * jnp.sum(is_masked, axis=1) / num_free)
    logits, nfe = engine.network_output(carry, lambda state: call_network(state, t),
                                        reuse_outputs)
    log_probs = engine.top_p_log_probs(logits, top_p)
    rng_value, rng_score = jax.random.split(jax.random.fold_in(rng, iteration))
    if temperature == 0:
      values = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    else:
      values = draws.categorical(rng_value, log_probs / temperature)
    log_p = jnp.take_along_axis(log_probs, values[..., None], axis=-1)[..., 0]
    log_p = log_p.reshape(batch_size, num_positions)
    if order == "confidence":
      score = log_p
    elif order == "maskgit":
      gumbel = -jnp.log(draws.exponential_from_bits(
          jax.random.bits(rng_score, log_p.shape, jnp.uint32)))
      anneal = 1.0 - (block_step + 1) / block_steps
      score = log_p + choice_temperature * anneal[:, None] * gumbel
    else:
      score = draws.uniform(rng_score, log_p.shape)
    block = jnp.min(jnp.where(is_masked, block_of, num_blocks), axis=1)
    eligible = is_masked & (block_of == block[:, None])
    keep = jnp.floor(block_masked[rows, jnp.minimum(block, num_blocks - 1)]
                     * kept[block_step]).astype(jnp.int32)
    count = jnp.sum(eligible, axis=1) - keep
    score = jnp.where(eligible, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
    chosen = eligible & (rank < count[:, None])
    if threshold > 0:
      chosen |= eligible & (log_p >= math.log(threshold))
    next_state = reveal(carry.state, chosen.reshape(logits_shape[:-1]), values)
    block_done = ~jnp.any(eligible & ~chosen, axis=1)
    block_step = jnp.where(block_done, 0, block_step + 1)
    next_carry = engine.advance(carry.state, next_state, logits, nfe, mask_id, reuse_outputs)
    return next_carry, iteration + 1, block_step

  init = engine.initial_carry(state, logits_shape, mask_id, reuse_outputs)
  final, _, _ = jax.lax.while_loop(
      lambda loop: jnp.any(masked(loop[0].state)), step,
      (init, jnp.int32(0), jnp.zeros((batch_size,), jnp.int32)))
  return start.finish(final)


# maskgit and llada are one block in a fixed order (llada's ranking has no noise to scale);
# every default is measured (docs/sampling.md, "Default sampler options").
MASKGIT = samplers.register(samplers.Sampler(
    "maskgit", functools.partial(run, order="maskgit", block_size=0),
    {"temperature": 1.0, "choice_temperature": 4.5, "threshold": 0.0}))
LLADA = samplers.register(samplers.Sampler(
    "llada", functools.partial(run, order="confidence", choice_temperature=0.0, block_size=0),
    {"temperature": 1.0, "threshold": 0.0}))
BLOCKS = samplers.register(samplers.Sampler(
    "blocks", run, {"block_size": 32, "order": "maskgit", "temperature": 1.0,
                    "choice_temperature": 4.5, "threshold": 0.0}))
