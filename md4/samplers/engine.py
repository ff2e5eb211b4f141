"""What every sampler shares: time grids, the loop carry, network calls and
their reuse, given positions, and the `Space` a model type samples in.

Time grid 1 = t_0 > t_1 > ... > t_T = 0:

    uniform   t_i = 1 - i / T
    cosine    t_i = cos(pi/2 * i / T)   (MD4's grid: fine steps near t = 1)

A `Space` is one model type's sampling state and reveal rule: its entries
(MD4's tokens, Prime's sub-tokens) are masked one by one, the network gives
logits over the values of each position, and a revealed position takes the
entries of its drawn value. `start` checks a request and builds the initial
state (given positions set, the rest masked); a sampler runs from there and
returns `Samples` (tokens and the network evaluations spent, NFE).

Output reuse: after a step that changed nothing, the network's input is the
same, and a network that ignores t (`check_ignores_time`) would give the same
output, so `network_output` skips the call and the NFE counts only real
calls. Every loop is a `lax.fori_loop` or `lax.while_loop`; callers jit the
whole sampler with the Python arguments static.
"""

import dataclasses
import math
from typing import Callable, NamedTuple, Protocol

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from md4 import checks
from md4 import schedule as schedule_lib

Array = jnp.ndarray

GRIDS = ("uniform", "cosine")
# The default time grid: the uniform one, by exact KL (docs/sampling.md, "Default time grid").
DEFAULT_GRID = "uniform"


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




class Space(Protocol):
  """A model type's sampling state: entries [B, *P, *S] over positions [B, *P].

  Attributes:
    mask_id: the id of a masked entry.
    num_values: V, the values of a position (the logits' last axis).
    entry_shape: S, the entries of one position: () for a token, (l,) for
      Prime's sub-tokens.
    schedule: the schedule reveal counts and network times follow.
    features: what samplers may need of it (`samplers.Sampler.needs`):
      "one_schedule" (every value is masked by `schedule`), "remasking" (a
      revealed entry may be masked again), "frames" (its states are tokens
      that `md4.samples` can draw).
  """

  mask_id: int
  num_values: int
  entry_shape: tuple[int, ...]
  schedule: schedule_lib.Schedule
  features: frozenset[str]

  def entries(self, values: Array) -> Array:
    """The entries int32 [..., *S] of values [...]."""

  def decode(self, state: Array) -> Array:
    """Tokens int32 [B, *P] of a state with no mask id left."""

  def allowed_logits(self, logits: Array, state: Array) -> Array:
    """float32 logits [B, *P, V] with -inf on values the state rules out."""

  def reveal_prob(self, t: Array, s: Array, values: Array) -> Array:
    """Probability that a masked entry of a position drawing values [B, *P] is
    revealed from t to s, broadcastable to values."""


class Samples(NamedTuple):
  """A sampler's output.

  Attributes:
    tokens: int32 [B, *P], no mask id left.
    nfe: int32 [], network evaluations spent.
    frames: int32 [F, B, *P, *S] snapshots of the reverse process (mask id
      included), or None when none were asked for.
  """

  tokens: Array
  nfe: Array
  frames: Array | None = None


@dataclasses.dataclass(frozen=True)
class Start:
  """A checked sampling request, as every sampler reads it.

  Attributes:
    call_network: (state, t [B]) -> float32 logits [B, *P, V], shape-checked,
      values the state rules out at -inf.
    space: the model type's `Space`.
    state: int32 [B, *P, *S], given positions set, every other entry masked.
    given: bool [B, *P], the positions given (never changed).
    steps: T, network steps (samplers on a time grid).
    grid: the time grid's name.
    top_p: nucleus mass, or None for the full softmax.
    reuse_outputs: reuse the last output after a step that changed nothing.
    num_frames: snapshots of the state to record (0: none).
  """

  call_network: Callable[[Array, Array], Array]
  space: Space
  state: Array
  given: Array
  steps: int
  grid: str
  top_p: float | None
  reuse_outputs: bool
  num_frames: int

  @property
  def logits_shape(self) -> tuple[int, ...]:
    return self.given.shape + (self.space.num_values,)

  def masked(self, state: Array) -> bool:
    """bool [B, *P]: positions with an entry still masked."""
    is_masked = state == self.space.mask_id
    return jnp.any(is_masked.reshape(self.given.shape + (-1,)), axis=-1)

  def reveal(self, state: Array, chosen: Array, values: Array) -> Array:
    """state with every entry of the chosen positions [B, *P] set from values [B, *P]."""
    chosen = chosen.reshape(chosen.shape + (1,) * len(self.space.entry_shape))
    return jnp.where(chosen, self.space.entries(values), state)

  def finish(self, carry: Carry, frames: Array | None = None) -> Samples:
    return Samples(tokens=self.space.decode(carry.state), nfe=carry.nfe, frames=frames)


def start(predict_fn: checks.PredictFn, rng: Array, space: Space, *, shape: tuple[int, ...],
          steps: int, grid: str = DEFAULT_GRID, top_p: float | None = None,
          prefix: Array | None = None, infill: tuple[Array, Array] | None = None,
          reuse_outputs: bool = False, num_frames: int = 0) -> Start:
  """The `Start` of a request; ValueError naming the first bad argument.

  shape is [B, *P]; prefix [B, P'] gives the first P' positions (row-major),
  infill (template, given) [B, *P] the positions where given is True (the
  prefix wins where both give one). With reuse_outputs, a predict_fn whose
  output t can reach is refused.
  """
  checks.positive_int(steps, "steps")
  time_grid(steps, grid)
  check_args(rng, shape, space.num_values, space.schedule, top_p)
  if not checks.is_int(num_frames) or num_frames < 0:
    raise ValueError(f"num_frames must be an int >= 0, got {num_frames!r}")
  shape = tuple(int(d) for d in shape)
  given, template = given_positions(shape, space.num_values, prefix, infill)
  expanded = given.reshape(shape + (1,) * len(space.entry_shape))
  state = jnp.where(expanded, space.entries(template), space.mask_id).astype(jnp.int32)
  if reuse_outputs:
    check_ignores_time(predict_fn, state)

  def call_network(state: Array, t: Array) -> Array:
    logits = predict_fn(state, t.astype(jnp.float32))
    logits = checks.logits(logits, shape + (space.num_values,)).astype(jnp.float32)
    return space.allowed_logits(logits, state)

  return Start(call_network, space, state, given, steps, grid, top_p, reuse_outputs,
               num_frames)
