"""MD4 samplers over a `predict_fn`: ancestral and top-p, confidence-ordered
(MaskGIT, LLaDA), semi-autoregressive blocks, ReMDM remasking and
first-hitting, with prefix, infill and reuse of network outputs.

Time grid 1 = t_0 > t_1 > ... > t_T = 0:

    uniform   t_i = 1 - i / T
    cosine    t_i = cos(pi/2 * i / T)   (MD4's grid: fine steps near t = 1)

Step i goes from t = t_i to s = t_{i+1}: each masked position is revealed with
probability (alpha_s - alpha_t) / (1 - alpha_t), to a draw from
softmax(logits) (or its renormalised top-p nucleus); the reveal and the value
are drawn apart, each at its probability (`draws`); revealed positions never
change. Positions still masked after the last step take the network's most
likely value under the logits of that step, so a run costs exactly T network
evaluations, or fewer with `reuse_outputs`: after a step that changed
nothing, the network's input is the same, and a network that ignores t
(`check_ignores_time`) would give the same output. The helpers `Carry`,
`network_output` and `advance` do that bookkeeping for every sampler.

Beyond ancestral (docs/sampling.md has the conventions and their sources):

  ordered        (`ordered_unmasking`) each step draws a value x_hat for
                 every masked position and reveals the k with the highest
                 score: "confidence" p(x_hat) (LLaDA's low-confidence
                 remasking), "maskgit" log p(x_hat) plus Gumbel noise
                 annealed to 0, or "random" (exact counts in random order);
                 k follows the schedule on the grid, or, with a threshold,
                 every score above it (Fast-dLLM), so that the run can end
                 early. block_size decodes blocks left to right
                 (semi-autoregressive, LLaDA).
  remdm          (`remdm`) ReMDM's posterior: a revealed token is remasked
                 with probability sigma_t ("cap", "rescale" or "loop").
  first_hitting  (`first_hitting`) the exact reverse process of a network
                 that ignores t: one uniformly chosen masked position per
                 network call, at the time its reveal first happens.

The network sees a time t in every sampler: where the sampler has no grid
time (ordered, first-hitting) it is the t at which the schedule masks the
fraction of free positions still masked (`time_at_mask_prob`).

Every loop is a `lax.fori_loop`; callers jit the whole sampler with the
Python arguments static, e.g.

    fn = jax.jit(lambda rng: sampler.ancestral(predict_fn, rng, shape=(B, L),
                                               vocab_size=V, schedule=sch,
                                               steps=T))
"""

import math
from typing import Callable, NamedTuple

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from md4 import checks
from md4 import draws
from md4 import schedule as schedule_lib

Array = jnp.ndarray

GRIDS = ("uniform", "cosine")


def time_grid(steps: int, grid: str) -> np.ndarray:
  """Times 1 = t_0 > ... > t_T = 0 [T + 1], float32 (see module docstring)."""
  checks.positive_int(steps, "steps")
  if grid not in GRIDS:
    raise ValueError(f"unknown grid {grid!r}; valid grids: {', '.join(GRIDS)}")
  fraction = np.arange(steps + 1, dtype=np.float64) / steps
  if grid == "uniform":
    times = 1.0 - fraction
  else:
    times = np.cos(np.pi / 2 * fraction)
  # cos(pi/2) is 6e-17, not 0: pin both ends exactly.
  times[0], times[-1] = 1.0, 0.0
  return times.astype(np.float32)


def reveal_probs(sch: schedule_lib.Schedule, times: Array) -> Array:
  """(alpha_s - alpha_t) / (1 - alpha_t) for consecutive (t, s) [T], in [0, 1]."""
  times = jnp.asarray(times, jnp.float32)
  t, s = times[:-1], times[1:]
  # eps = 0 makes 1 - alpha_t vanish only where everything is revealed anyway.
  denominator = jnp.maximum(sch.mask_prob(t), jnp.finfo(jnp.float32).tiny)
  return jnp.clip(sch.alpha_drop(s, t) / denominator, 0.0, 1.0)


def top_p_log_probs(logits: Array, top_p: float | None) -> Array:
  """Log-probabilities of the renormalised top-p nucleus [..., V]; -inf outside.

  The nucleus is the smallest set of most likely values whose mass reaches
  top_p, widened to every value tied with its least likely member, so the
  result never depends on the order of tied values. top_p None or 1.0 gives
  the plain log-softmax.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if top_p is None or top_p >= 1.0:
    return log_probs
  probs = jnp.exp(log_probs)
  sorted_probs = -jnp.sort(-probs, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  # The most likely value always counts: its mass_before is exactly 0 < top_p.
  num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_probs, num_kept - 1, axis=-1)
  return jax.nn.log_softmax(
      jnp.where(probs >= threshold, log_probs, -jnp.inf), axis=-1)


class Carry(NamedTuple):
  """A sampler's loop state.

  Attributes:
    state: int32 [B, ...] (with mask ids), the network's next input.
    logits: float32 [B, ..., V], the last network output; None without reuse.
    nfe: int32 [], network evaluations so far.
    changed: bool [], whether state changed in the last step with something
      left to draw, so that the network must run again.
  """

  state: Array
  logits: Array | None
  nfe: Array
  changed: Array


def initial_carry(state: Array, logits_shape: tuple[int, ...], mask_id: int,
                  reuse_outputs: bool) -> Carry:
  """The carry before the first step from state [B, ...]."""
  logits = jnp.zeros(logits_shape, jnp.float32) if reuse_outputs else None
  return Carry(state, logits, jnp.int32(0), jnp.any(state == mask_id))


def network_output(carry: Carry, call_network: Callable[[Array], Array],
                   reuse_outputs: bool) -> tuple[Array, Array]:
  """(logits, nfe) of a step: call_network(carry.state), or the carried logits if reusing them."""
  if not reuse_outputs:
    return call_network(carry.state), carry.nfe + 1
  logits = jax.lax.cond(carry.changed, call_network, lambda _: carry.logits, carry.state)
  return logits, carry.nfe + carry.changed.astype(jnp.int32)


def advance(state: Array, next_state: Array, logits: Array, nfe: Array, mask_id: int,
            reuse_outputs: bool) -> Carry:
  """The carry after a step from state to next_state that used logits."""
  changed = jnp.any(next_state != state) & jnp.any(next_state == mask_id)
  return Carry(next_state, logits if reuse_outputs else None, nfe, changed)


def check_ignores_time(predict_fn: checks.PredictFn, state: Array) -> None:
  """Raises ValueError if t can reach predict_fn(state, t)'s output.

  Reusing the output of such a network across steps would feed it stale
  times. Read from the jaxpr: t taints the outputs of every equation it
  enters, followed into nested calls (jit, remat, custom derivatives) whose
  inputs match, so a t that is read and then dropped does not count.
  """
  specs = (jax.ShapeDtypeStruct(state.shape, jnp.int32),
           jax.ShapeDtypeStruct(state.shape[:1], jnp.float32))
  jaxpr = jax.make_jaxpr(predict_fn)(*specs).jaxpr
  if any(_tainted_outputs(jaxpr, [False, True])):
    raise ValueError("reuse_outputs: predict_fn reads t, so its output cannot be reused "
                     "across steps; reuse only a network that ignores t "
                     "(time_conditioning='none')")


def _tainted_outputs(jaxpr: jax_core.Jaxpr, tainted_inputs: list[bool]) -> list[bool]:
  """Which outputs of jaxpr depend on the inputs flagged in tainted_inputs."""
  tainted = {var for var, flag in zip(jaxpr.invars, tainted_inputs) if flag}

  def is_tainted(var) -> bool:
    return not isinstance(var, jax_core.Literal) and var in tainted

  for eqn in jaxpr.eqns:
    inputs = [is_tainted(var) for var in eqn.invars]
    if not any(inputs):
      continue
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    inner = inner.jaxpr if isinstance(inner, jax_core.ClosedJaxpr) else inner
    if (isinstance(inner, jax_core.Jaxpr) and len(inner.invars) == len(eqn.invars)
        and len(inner.outvars) == len(eqn.outvars)):
      outputs = _tainted_outputs(inner, inputs)
    else:
      outputs = [True] * len(eqn.outvars)
    tainted.update(var for var, flag in zip(eqn.outvars, outputs) if flag)
  return [is_tainted(var) for var in jaxpr.outvars]


def ancestral(predict_fn: checks.PredictFn,
              rng: Array,
              *,
              shape: tuple[int, ...],
              vocab_size: int,
              schedule: schedule_lib.Schedule,
              steps: int,
              grid: str = "cosine",
              top_p: float | None = None,
              prefix: Array | None = None,
              infill: tuple[Array, Array] | None = None,
              reuse_outputs: bool = False,
              return_nfe: bool = False,
              num_frames: int = 0) -> Array | tuple[Array, ...]:
  """Samples z int32 [B, ...] = `shape` in {0..V-1} from a masked diffusion model.

  Args:
    predict_fn: (z [B, ...] int32 with mask id V, t [B] float32) -> logits
      [B, ..., V]. Every dim of `shape` after B is a position.
    rng: a PRNG key.
    shape: (B, L) for text, (B, H, W, C) for images, ...
    vocab_size: V; the mask id is V.
    schedule: the masking schedule the model was trained with.
    steps: T, the number of network steps.
    grid: "uniform" or "cosine" time grid (module docstring).
    top_p: draw from the renormalised top-p nucleus (see `top_p_log_probs`);
      None or 1.0 draws from the full softmax.
    prefix: int32 [B, P]; the first P positions (row-major over the dims
      after B) are given and never change.
    infill: (template int32 [B, ...], given bool [B, ...]); positions where
      `given` is True hold `template` from the start and never change
      (template values elsewhere are ignored). Where prefix and infill both
      give a position, the prefix wins.
    reuse_outputs: skip the network in a step when no position changed since
      its last call, reusing those logits. Only for a network that ignores
      t: one whose output t can reach is refused (`check_ignores_time`). The
      skip is decided for the whole batch at once.
    return_nfe: also return the number of network evaluations spent.
    num_frames: also return F = num_frames snapshots of the state [F, B, ...]
      (mask id included) at evenly spaced steps, the first before any step and
      the last after all of them, to show the reverse process.

  Returns:
    z int32 [B, ...] with no mask id left; with return_nfe and/or num_frames,
    the tuple (z, nfe int32 [], frames) with only the ones asked for. Without
    reuse_outputs nfe == steps.
  """
  shape, _, z_init = initial_state(predict_fn, rng, shape, vocab_size, schedule, top_p, prefix,
                                   infill, reuse_outputs)
  mask_id = vocab_size
  batch_size = shape[0]
  times = jnp.asarray(time_grid(steps, grid))
  probs = reveal_probs(schedule, times)

  def call_network(z: Array, t: Array) -> Array:
    logits = predict_fn(z, jnp.full((batch_size,), t, jnp.float32))
    return checks.logits(logits, shape + (vocab_size,)).astype(jnp.float32)

  frame_steps = jnp.asarray(np.unique(np.linspace(0, steps, max(num_frames, 1)).round()),
                            jnp.int32)

  def step(i: Array, carry: tuple[Carry, Array | None]) -> tuple[Carry, Array | None]:
    loop, frames = carry
    z = loop.state
    logits, nfe = network_output(loop, lambda z: call_network(z, times[i]), reuse_outputs)
    draw = _draw(jax.random.fold_in(rng, i), top_p_log_probs(logits, top_p),
                 probs[i], mask_id)
    z_next = jnp.where(z == mask_id, draw, z)
    z_next = jnp.where((i == steps - 1) & (z_next == mask_id),
                       jnp.argmax(logits, axis=-1).astype(jnp.int32), z_next)
    if num_frames:
      index = jnp.minimum(jnp.searchsorted(frame_steps, i + 1), len(frame_steps) - 1)
      frames = jnp.where(frame_steps[index] == i + 1, frames.at[index].set(z_next), frames)
    return advance(z, z_next, logits, nfe, mask_id, reuse_outputs), frames

  frames = jnp.broadcast_to(z_init, (len(frame_steps),) + shape) if num_frames else None
  init = initial_carry(z_init, shape + (vocab_size,), mask_id, reuse_outputs)
  final, frames = jax.lax.fori_loop(0, steps, step, (init, frames))
  outputs = ((final.state,) + ((final.nfe,) if return_nfe else ())
             + ((frames,) if num_frames else ()))
  return outputs if len(outputs) > 1 else final.state


def initial_state(predict_fn: checks.PredictFn, rng: Array, shape: tuple[int, ...],
                  vocab_size: int, schedule: schedule_lib.Schedule, top_p: float | None,
                  prefix: Array | None, infill: tuple[Array, Array] | None,
                  reuse_outputs: bool) -> tuple[tuple[int, ...], Array, Array]:
  """(shape as ints, given bool `shape`, z int32 `shape`: the given values, else the mask id
  V) after checking the arguments, and that predict_fn ignores t if reusing outputs."""
  check_args(rng, shape, vocab_size, schedule, top_p)
  shape = tuple(int(d) for d in shape)
  given, template = given_positions(shape, vocab_size, prefix, infill)
  z_init = jnp.where(given, template, vocab_size).astype(jnp.int32)
  if reuse_outputs:
    check_ignores_time(predict_fn, z_init)
  return shape, given, z_init


def _draw(rng: Array, log_probs: Array, reveal_prob: Array, mask_id: int) -> Array:
  """Next state of a masked position [B, ...]: a value, or mask_id if unrevealed."""
  rng_value, rng_reveal = jax.random.split(rng)
  values = draws.categorical(rng_value, log_probs)
  reveal = draws.bernoulli(rng_reveal, reveal_prob, values.shape)
  return jnp.where(reveal, values, mask_id)


def given_positions(shape: tuple[int, ...], vocab_size: int,
                    prefix: Array | None,
                    infill: tuple[Array, Array] | None) -> tuple[Array, Array]:
  """(given bool, template int32), both `shape`, from prefix and infill (see `ancestral`)."""
  given = jnp.zeros(shape, jnp.bool_)
  template = jnp.zeros(shape, jnp.int32)
  if infill is not None:
    if not isinstance(infill, (tuple, list)) or len(infill) != 2:
      raise ValueError("infill must be a pair (template, given)")
    template, given = jnp.asarray(infill[0]), jnp.asarray(infill[1])
    if given.dtype != jnp.bool_:
      raise ValueError(f"infill given must be a bool array, got dtype {given.dtype}")
    if template.shape != shape or given.shape != shape:
      raise ValueError(f"infill template {template.shape} and given "
                       f"{given.shape} must both have shape {shape}")
    if not jnp.issubdtype(template.dtype, jnp.integer):
      raise ValueError(
          f"infill template must hold integer token ids, got dtype {template.dtype}")
    # Only the given positions must be valid ids; elsewhere anything goes.
    with jax.ensure_compile_time_eval():
      checks.tokens(jnp.where(given, template, 0), vocab_size,
                    name="infill template (at given positions)")
    template = template.astype(jnp.int32)
  if prefix is not None:
    prefix = jnp.asarray(prefix)
    num_positions = math.prod(shape[1:])
    if prefix.ndim != 2 or prefix.shape[0] != shape[0]:
      raise ValueError(f"prefix must have shape [B, P] with B = {shape[0]}, "
                       f"got {prefix.shape}")
    length = prefix.shape[1]
    if length > num_positions:
      raise ValueError(f"prefix has {length} positions, more than the "
                       f"{num_positions} of shape {shape}")
    if length == 0:
      return given, template
    # Under jit a concrete prefix still gets its values checked.
    with jax.ensure_compile_time_eval():
      checks.tokens(prefix, vocab_size, name="prefix")
    given = given.reshape(shape[0], -1).at[:, :length].set(True).reshape(shape)
    template = template.reshape(shape[0], -1).at[:, :length].set(
        prefix.astype(jnp.int32)).reshape(shape)
  return given, template


def check_args(rng: Array, shape: tuple[int, ...], vocab_size: int,
               schedule: schedule_lib.Schedule, top_p: float | None) -> None:
  """Raises ValueError naming the first bad argument (steps and grid: `time_grid`)."""
  checks.rng(rng)
  checks.shape(shape)
  checks.vocab_size(vocab_size)
  if not callable(getattr(schedule, "alpha", None)):
    raise ValueError(f"schedule must be a schedule.Schedule (see schedule.get), "
                     f"got {schedule!r}")
  checks.top_p(top_p)


# Every sampler by name, with the options it takes beyond those of `ancestral`.
SAMPLER_OPTIONS = {
    "ancestral": (),
    "maskgit": ("temperature", "choice_temperature", "threshold"),
    "llada": ("temperature", "threshold"),
    "blocks": ("block_size", "order", "temperature", "choice_temperature", "threshold"),
    "remdm": ("strategy", "eta", "t_on", "t_off", "alpha_on"),
    "first_hitting": (),
}
SAMPLERS = tuple(SAMPLER_OPTIONS)
ORDERS = ("confidence", "maskgit", "random")
REMDM_STRATEGIES = ("cap", "rescale", "loop")


def sampler_options(name: str, options: dict) -> dict:
  """The keyword arguments of sampler `name` for its options; ValueError naming a bad one.

  maskgit and llada are `sample_ordered` with order "maskgit" and
  "confidence"; blocks needs a block_size.
  """
  if name not in SAMPLER_OPTIONS:
    raise ValueError(f"sampler={name!r}; valid: {', '.join(SAMPLERS)}")
  unknown = sorted(set(options) - set(SAMPLER_OPTIONS[name]))
  if unknown:
    raise ValueError(f"sampler {name!r} has no option {', '.join(unknown)}; its options: "
                     f"{', '.join(SAMPLER_OPTIONS[name]) or 'none'}")
  if name == "blocks" and "block_size" not in options:
    raise ValueError("sampler 'blocks' needs a block_size")
  if name in ("maskgit", "llada"):
    return {"order": "maskgit" if name == "maskgit" else "confidence", **options}
  return dict(options)


def time_at_mask_prob(sch: schedule_lib.Schedule, mask_prob: Array) -> Array:
  """t float32 [...] in [0, 1] with sch.mask_prob(t) = mask_prob [...], by bisection.

  Targets outside the schedule's range give its end points.
  """
  target = jnp.asarray(mask_prob, jnp.float32)

  def halve(_, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
    low, high = bounds
    middle = 0.5 * (low + high)
    below = sch.mask_prob(middle) < target
    return jnp.where(below, middle, low), jnp.where(below, high, middle)

  low, high = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(target), jnp.ones_like(target)))
  return 0.5 * (low + high)


def check_ordered_args(order: str, temperature: float, choice_temperature: float,
                       threshold: float | None, block_size: int | None, steps: int,
                       num_positions: int) -> int:
  """Raises ValueError naming a bad option of `ordered_unmasking`; returns the number of blocks."""
  if order not in ORDERS:
    raise ValueError(f"order={order!r}; valid: {', '.join(ORDERS)}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: the most likely value), got {temperature}")
  if not choice_temperature >= 0:
    raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
  if threshold is not None and not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be None or in (0, 1], got {threshold}")
  checks.positive_int(steps, "steps")
  if block_size is None:
    return 1
  checks.positive_int(block_size, "block_size")
  num_blocks = -(-num_positions // block_size)
  if steps % num_blocks:
    raise ValueError(f"steps={steps} must be a multiple of the {num_blocks} blocks of "
                     f"block_size={block_size} over {num_positions} positions")
  return num_blocks


def ordered_unmasking(call_network: Callable[[Array, Array], Array],
                      rng: Array,
                      state: Array,
                      *,
                      masked: Callable[[Array], Array],
                      reveal: Callable[[Array, Array, Array], Array],
                      mask_id: int,
                      logits_shape: tuple[int, ...],
                      schedule: schedule_lib.Schedule,
                      steps: int,
                      grid: str = "cosine",
                      order: str = "confidence",
                      temperature: float = 1.0,
                      choice_temperature: float = 4.5,
                      threshold: float | None = None,
                      block_size: int | None = None,
                      top_p: float | None = None,
                      reuse_outputs: bool = False) -> Carry:
  """Confidence-ordered unmasking over positions, in blocks; the final carry.

  Model-agnostic: `sample_ordered` (MD4, GenMD4) and `prime.sample_ordered`
  call it with their state and reveal rule.

  Args:
    call_network: (state, t [B]) -> logits float32 `logits_shape` = [B, *P, V]
      over the values allowed at each position.
    rng: a PRNG key.
    state: the initial state (mask id `mask_id` where not given).
    masked: state -> bool [B, *P], the positions not yet revealed.
    reveal: (state, chosen bool [B, *P], values int32 [B, *P]) -> state with
      the chosen positions set to their values.
    mask_id: the mask id in state.
    logits_shape: [B, *P, V].
    schedule, steps, grid: how many positions each step reveals: after step
      j of a block's steps // num_blocks, the block keeps
      floor(M mask_prob(t_{j+1}) / mask_prob(t_0)) of its M masked positions
      (t on `time_grid`); with the linear schedule and the uniform grid, an
      even split (LLaDA). steps must be a multiple of the number of blocks.
    order: the score that ranks masked positions: "confidence" p(x_hat),
      "maskgit" log p(x_hat) + choice_temperature (1 - j / k) Gumbel, or
      "random".
    temperature: x_hat is drawn from softmax(logits / temperature); 0 takes
      the most likely value; 1 draws at the model's probabilities.
    choice_temperature: MaskGIT's noise on the ranking (order "maskgit").
    threshold: also reveal every position with p(x_hat) >= threshold; rows
      whose blocks finish early move on, and the loop ends when no position
      is masked, after at most `steps` network calls.
    block_size: decode blocks of this many positions (row-major) left to
      right, each to the end before the next; None: one block.
    top_p: x_hat and its probability come from the top-p nucleus.
    reuse_outputs: as in `ancestral`.
  """
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
  block_times = time_grid(block_steps, grid)
  kept = jnp.asarray(schedule.mask_prob(block_times[1:]) / schedule.mask_prob(block_times[0]))
  kept = kept.at[-1].set(0.0)
  num_free = jnp.maximum(jnp.sum(free, axis=1), 1)
  rows = jnp.arange(batch_size)

  def step(loop: tuple[Carry, Array, Array]) -> tuple[Carry, Array, Array]:
    carry, iteration, block_step = loop
    is_masked = masked(carry.state).reshape(batch_size, num_positions)
    t = time_at_mask_prob(schedule, schedule.mask_prob(1.0) * jnp.sum(is_masked, axis=1)
                          / num_free)
    logits, nfe = network_output(carry, lambda state: call_network(state, t), reuse_outputs)
    log_probs = top_p_log_probs(logits, top_p)
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
    if threshold is not None:
      chosen |= eligible & (log_p >= math.log(threshold))
    next_state = reveal(carry.state, chosen.reshape(logits_shape[:-1]), values)
    block_done = ~jnp.any(eligible & ~chosen, axis=1)
    block_step = jnp.where(block_done, 0, block_step + 1)
    next_carry = advance(carry.state, next_state, logits, nfe, mask_id, reuse_outputs)
    return next_carry, iteration + 1, block_step

  init = initial_carry(state, logits_shape, mask_id, reuse_outputs)
  final, _, _ = jax.lax.while_loop(
      lambda loop: jnp.any(masked(loop[0].state)), step,
      (init, jnp.int32(0), jnp.zeros((batch_size,), jnp.int32)))
  return final


def first_hitting_loop(call_network: Callable[[Array, Array], Array],
                       rng: Array,
                       state: Array,
                       *,
                       mask_id: int,
                       entries: Callable[[Array], Array],
                       logits_shape: tuple[int, ...],
                       schedule: schedule_lib.Schedule,
                       top_p: float | None = None) -> Carry:
  """The first-hitting sampler (Zheng et al., 2024) over the masked entries of state.

  With n entries of a row masked at time t, the first of them is revealed at
  tau with mask_prob(tau) = mask_prob(t) u^(1/n), u ~ U(0, 1); it is a
  uniformly chosen masked entry, set to its share of a draw x_hat ~
  softmax(call_network(state, tau)). For a network that ignores t this is
  the model's reverse process exactly, for any n: one network call per
  revealed entry, as many calls as the most masked row has entries.

  Args:
    call_network: (state, t [B]) -> logits `logits_shape` [B, *P, V].
    rng: a PRNG key.
    state: int32 [B, *E] with mask id mask_id where not given.
    mask_id: the mask id.
    entries: values x_hat int32 [B, *P] -> the entries int32 [B, *E] they
      set (MD4: the values; Prime: their sub-token digits).
    logits_shape: [B, *P, V].
    schedule: the model's schedule.
    top_p: draw x_hat from the top-p nucleus (no longer exact).
  """
  batch_size = state.shape[0]

  def step(loop: tuple[Carry, Array]) -> tuple[Carry, Array]:
    carry, t = loop
    is_masked = (carry.state == mask_id).reshape(batch_size, -1)
    num_masked = jnp.sum(is_masked, axis=1)
    rng_time, rng_value, rng_choice = jax.random.split(jax.random.fold_in(rng, carry.nfe), 3)
    u = draws.uniform(rng_time, (batch_size,))
    tau = jnp.where(num_masked > 0,
                    time_at_mask_prob(schedule, schedule.mask_prob(t)
                                      * u**(1.0 / jnp.maximum(num_masked, 1))), t)
    logits = call_network(carry.state, tau)
    values = draws.categorical(rng_value, top_p_log_probs(logits, top_p))
    choice = jnp.where(is_masked, draws.uniform(rng_choice, is_masked.shape), -1.0)
    hit = jax.nn.one_hot(jnp.argmax(choice, axis=1), is_masked.shape[1], dtype=jnp.bool_)
    hit = (hit & is_masked).reshape(carry.state.shape)
    next_state = jnp.where(hit, entries(values), carry.state)
    return Carry(next_state, None, carry.nfe + 1, jnp.bool_(True)), tau

  init = initial_carry(state, logits_shape, mask_id, False)
  final, _ = jax.lax.while_loop(lambda loop: jnp.any(loop[0].state == mask_id), step,
                                (init, jnp.ones((batch_size,), jnp.float32)))
  return final


def remdm_schedule(sch: schedule_lib.Schedule, steps: int, grid: str, strategy: str = "cap",
                   eta: float = 0.04, t_on: float = 0.55, t_off: float = 0.05,
                   alpha_on: float = 0.9) -> tuple[np.ndarray, ...]:
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
  if strategy not in REMDM_STRATEGIES:
    raise ValueError(f"remdm strategy={strategy!r}; valid: {', '.join(REMDM_STRATEGIES)}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"remdm eta must be in [0, 1], got {eta}")
  with jax.ensure_compile_time_eval():  # Concrete under jit: the steps are constants.
    return _remdm_steps(sch, time_grid(steps, grid).astype(np.float64), strategy, eta, t_on,
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
    network_times = np.asarray(time_at_mask_prob(sch, 1.0 - alpha[:-1]), np.float64)
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


def remdm(predict_fn: checks.PredictFn,
          rng: Array,
          *,
          shape: tuple[int, ...],
          vocab_size: int,
          schedule: schedule_lib.Schedule,
          steps: int,
          grid: str = "cosine",
          strategy: str = "cap",
          eta: float = 0.04,
          t_on: float = 0.55,
          t_off: float = 0.05,
          alpha_on: float = 0.9,
          top_p: float | None = None,
          prefix: Array | None = None,
          infill: tuple[Array, Array] | None = None,
          reuse_outputs: bool = False,
          return_nfe: bool = False) -> Array | tuple[Array, Array]:
  """ReMDM remasking sampler: z int32 `shape`, or (z, nfe) with return_nfe.

  T = steps steps of `remdm_schedule`; given positions are never remasked;
  positions masked after the last step take the most likely value, as in
  `ancestral`. eta = 0 is the ancestral sampler. Other arguments as in
  `ancestral`.
  """
  shape, given, z_init = initial_state(predict_fn, rng, shape, vocab_size, schedule, top_p,
                                       prefix, infill, reuse_outputs)
  mask_id = vocab_size
  alpha_t, alpha_s, sigma, network_times = remdm_schedule(schedule, steps, grid, strategy, eta,
                                                          t_on, t_off, alpha_on)
  reveal_prob = jnp.asarray(np.clip((alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t),
                                    0.0, 1.0), jnp.float32)
  remask_prob = jnp.asarray(sigma, jnp.float32)
  network_times = jnp.asarray(network_times, jnp.float32)
  call_network = _network_caller(predict_fn, shape, vocab_size)

  def step(i: Array, carry: Carry) -> Carry:
    z = carry.state
    logits, nfe = network_output(carry, lambda z: call_network(
        z, jnp.full((shape[0],), network_times[i])), reuse_outputs)
    rng_draw, rng_remask = jax.random.split(jax.random.fold_in(rng, i))
    drawn = _draw(rng_draw, top_p_log_probs(logits, top_p), reveal_prob[i], mask_id)
    remask = draws.bernoulli(rng_remask, remask_prob[i], shape) & ~given
    z_next = jnp.where(z == mask_id, drawn, jnp.where(remask, mask_id, z))
    z_next = jnp.where((i == steps - 1) & (z_next == mask_id),
                       jnp.argmax(logits, axis=-1).astype(jnp.int32), z_next)
    return advance(z, z_next, logits, nfe, mask_id, reuse_outputs)

  init = initial_carry(z_init, shape + (vocab_size,), mask_id, reuse_outputs)
  final = jax.lax.fori_loop(0, steps, step, init)
  return (final.state, final.nfe) if return_nfe else final.state


def sample_ordered(predict_fn: checks.PredictFn,
                   rng: Array,
                   *,
                   shape: tuple[int, ...],
                   vocab_size: int,
                   schedule: schedule_lib.Schedule,
                   steps: int,
                   grid: str = "cosine",
                   order: str = "confidence",
                   temperature: float = 1.0,
                   choice_temperature: float = 4.5,
                   threshold: float | None = None,
                   block_size: int | None = None,
                   top_p: float | None = None,
                   prefix: Array | None = None,
                   infill: tuple[Array, Array] | None = None,
                   reuse_outputs: bool = False,
                   return_nfe: bool = False) -> Array | tuple[Array, Array]:
  """MaskGIT / LLaDA / semi-autoregressive sampling (`ordered_unmasking`) of z int32 `shape`.

  Returns z, or (z, nfe) with return_nfe (nfe <= steps; fewer with a
  threshold or reuse). Other arguments as in `ancestral`.
  """
  shape, _, z_init = initial_state(predict_fn, rng, shape, vocab_size, schedule, top_p, prefix,
                                   infill, reuse_outputs)
  mask_id = vocab_size
  final = ordered_unmasking(
      _network_caller(predict_fn, shape, vocab_size), rng, z_init,
      masked=lambda z: z == mask_id,
      reveal=lambda z, chosen, values: jnp.where(chosen, values, z),
      mask_id=mask_id, logits_shape=shape + (vocab_size,), schedule=schedule, steps=steps,
      grid=grid, order=order, temperature=temperature, choice_temperature=choice_temperature,
      threshold=threshold, block_size=block_size, top_p=top_p, reuse_outputs=reuse_outputs)
  return (final.state, final.nfe) if return_nfe else final.state


def first_hitting(predict_fn: checks.PredictFn,
                  rng: Array,
                  *,
                  shape: tuple[int, ...],
                  vocab_size: int,
                  schedule: schedule_lib.Schedule,
                  top_p: float | None = None,
                  prefix: Array | None = None,
                  infill: tuple[Array, Array] | None = None,
                  return_nfe: bool = False) -> Array | tuple[Array, Array]:
  """First-hitting sampling (`first_hitting_loop`) of z int32 `shape`, or (z, nfe).

  nfe is the number of positions the most masked row generates. Other
  arguments as in `ancestral`.
  """
  shape, _, z_init = initial_state(predict_fn, rng, shape, vocab_size, schedule, top_p, prefix,
                                   infill, False)
  final = first_hitting_loop(_network_caller(predict_fn, shape, vocab_size), rng, z_init,
                             mask_id=vocab_size, entries=lambda values: values,
                             logits_shape=shape + (vocab_size,), schedule=schedule,
                             top_p=top_p)
  return (final.state, final.nfe) if return_nfe else final.state


def _network_caller(predict_fn: checks.PredictFn, shape: tuple[int, ...],
                    vocab_size: int) -> Callable[[Array, Array], Array]:
  """(z, t [B]) -> float32 logits [*shape, V], their shape checked."""

  def call_network(z: Array, t: Array) -> Array:
    logits = predict_fn(z, t.astype(jnp.float32))
    return checks.logits(logits, shape + (vocab_size,)).astype(jnp.float32)

  return call_network
