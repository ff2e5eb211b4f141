"""MD4 samplers over a `predict_fn`: ancestral and top-p, with prefix, infill
and reuse of network outputs.

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
  check_args(rng, shape, vocab_size, schedule, top_p)
  shape = tuple(int(d) for d in shape)
  mask_id = vocab_size
  batch_size = shape[0]
  given, template = given_positions(shape, vocab_size, prefix, infill)
  z_init = jnp.where(given, template, mask_id).astype(jnp.int32)
  if reuse_outputs:
    check_ignores_time(predict_fn, z_init)
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
