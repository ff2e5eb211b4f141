"""MDM-Prime (Chao et al., 2025): partial masking over sub-tokens.

A codec f writes each token class c in {0..C-1} as l base-b digits (most
significant first), b = ceil(C^(1/l)), optionally after a fixed seeded
permutation of the classes (index shuffling); binary means b = 2 and
l = ceil(log2 C). Each of the l L sub-tokens is masked independently with
probability 1 - alpha_t; the sub-token mask id is b. The network reads the
sub-token state y_t [B, L, l] and returns logits over the C classes per
position.

Carry-over: class c is allowed at position i only if f(c) agrees with every
unmasked sub-token there, and p(c | y_t) is the softmax over allowed classes.
The sub-token marginals are mu^{ij}(v) = sum_{c: f(c)_j = v} p(c | y_t).

The valid bound, reported and by default trained, is MD4's NELBO over the
sub-tokens:

    NELBO(x) = int_0^1 -w(t) E_q[ sum_i sum_{j: y_t^{ij} = m} -log mu^{ij}(y_0^{ij}) ] dt
               + L l (1 - alpha_0) log b + L l alpha_1 log b.

The reconstruction and prior terms code uniformly over its b digits each
sub-token still masked at t = 0 and each still unmasked at t = 1 (as in
`diffusion.loss`). That is a proper (sub-)distribution over digit strings:
the mass it puts on strings that encode no class only loosens the bound, and
l log b >= log C, so neither term is below MD4's; with alpha_0 = 1 - eps and
alpha_1 = eps the two bounds' end terms differ by O(eps) nats. For l = 1 and no shuffling
the whole loss is MD4's (`diffusion.loss`), draw for draw.

The per-token surrogate int -w(t) E_q[ sum_i -log p(x^i | y_t) ] dt
(objective="joint") is NOT a bound: on C = 4, l = 2, x in {00, 11} uniform it
gives (ln 2) / 2 per token with the exact posterior, below the entropy ln 2.
It may be trained, never reported as a likelihood.

Sampler, t -> s: draw x_hat^i ~ p(. | y_t) per position; each masked sub-token
is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t) as
f(x_hat^i)_j. Carry-over keeps every state consistent with some class, so the
final decode always succeeds. A step that reveals nothing leaves the
network's input as it was: for a network that ignores t its output is
reused (`reuse_outputs`). Beyond it: `sample_ordered` (MaskGIT, LLaDA,
blocks) ranks positions by p(x_hat^i | y_t) and reveals all sub-tokens of
the chosen ones; `sample_first_hitting` reveals one uniformly chosen masked
sub-token per network call, exact for a network that ignores t. (The NELBO above is that of a reverse process
revealing sub-tokens independently from mu; in continuous time at most one
sub-token is revealed at once and the two processes coincide.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4 import checks
from md4 import diffusion
from md4 import draws
from md4 import sampler as sampler_lib
from md4 import schedule as schedule_lib

Array = jnp.ndarray

OBJECTIVES = ("nelbo", "joint")
_INT32_MAX = 2**31 - 1


def smallest_base(num_classes: int, length: int) -> int:
  """The smallest b >= 1 with b**length >= num_classes, in exact integers."""
  base = max(1, round(num_classes**(1.0 / length)))
  while base**length < num_classes:
    base += 1
  while base > 1 and (base - 1)**length >= num_classes:
    base -= 1
  return base


class Codec:
  """Sub-token codec f: {0..C-1} -> {0..b-1}^l, most significant digit first.

  Attributes:
    num_classes: C.
    length: l, sub-tokens per token.
    base: b = ceil(C^(1/l)) (2 when binary); also the sub-token mask id.
    mask_id: b.
    shuffle_seed: seed of the class permutation, or None for none.
    digit_table: int32 [C, l], row c = f(c).
  """

  def __init__(self,
               num_classes: int,
               length: int | None = None,
               shuffle_seed: int | None = None,
               binary: bool = False):
    if not checks.is_int(num_classes) or not 1 <= num_classes <= _INT32_MAX:
      raise ValueError(
          f"num_classes must be an int in [1, 2**31), got {num_classes!r}")
    if binary:
      binary_length = max(1, (int(num_classes) - 1).bit_length())
      if length is not None and length != binary_length:
        raise ValueError(f"length={length!r} contradicts binary=True, which "
                         f"needs length ceil(log2 {num_classes}) = {binary_length}")
      length = binary_length
    if not checks.is_int(length) or length < 1:
      raise ValueError(f"length must be an int >= 1 (or binary=True), got {length!r}")
    if shuffle_seed is not None and not checks.is_int(shuffle_seed):
      raise ValueError(f"shuffle_seed must be None or an int, got {shuffle_seed!r}")
    self.num_classes = int(num_classes)
    self.length = int(length)
    self.base = 2 if binary else smallest_base(self.num_classes, self.length)
    self.mask_id = self.base
    self.shuffle_seed = shuffle_seed
    self.binary = bool(binary)
    # Place values b^(l-1-j), capped at C: a digit whose place is >= C must be
    # 0 in a valid code, and the cap keeps powers of b (b^l overflows int32
    # once C passes 3^17) out of the int32 arithmetic.
    self._places = np.array(
        [min(self.base**(self.length - 1 - j), self.num_classes)
         for j in range(self.length)], np.int64)
    largest_value = int(((self.base - 1) * self._places).sum())
    if largest_value > _INT32_MAX:
      raise ValueError(f"num_classes={num_classes}, length={length}: digit "
                       f"strings worth up to {largest_value} overflow int32 "
                       f"decoding")
    if shuffle_seed is None:
      values = np.arange(self.num_classes, dtype=np.int64)
    else:
      values = np.random.default_rng(shuffle_seed).permutation(self.num_classes)
    self.digit_table = ((values[:, None] // self._places) % self.base).astype(np.int32)
    # class_of_value[v] = c with value(f(c)) = v: the inverse permutation.
    self._class_of_value = np.argsort(values).astype(np.int32)

  def __repr__(self) -> str:
    return (f"Codec(num_classes={self.num_classes}, length={self.length}, "
            f"base={self.base}, shuffle_seed={self.shuffle_seed}, binary={self.binary})")

  def encode(self, x: Array) -> Array:
    """Digits f(x) int32 [..., l] of classes x [...].

    numpy in, numpy out (host-side, for data pipelines); jax arrays and
    tracers go through jax.numpy.
    """
    xp = _array_module(x)
    x = xp.asarray(x)
    if not xp.issubdtype(x.dtype, xp.integer):
      raise ValueError(f"x must hold integer class ids, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and x.size:
      # NumPy, so that a concrete x closed over inside jit is not traced.
      values = np.asarray(x)
      low, high = int(values.min()), int(values.max())
      if low < 0 or high >= self.num_classes:
        raise ValueError(f"x has class ids in [{low}, {high}], outside "
                         f"[0, {self.num_classes})")
    return xp.take(self.digit_table, x, axis=0)

  def _check_digits(self, y: Array) -> Array:
    xp = _array_module(y)
    y = xp.asarray(y)
    if not xp.issubdtype(y.dtype, xp.integer):
      raise ValueError(f"y must hold integer digits, got dtype {y.dtype}")
    if y.ndim < 1 or y.shape[-1] != self.length:
      raise ValueError(f"y must have shape [..., {self.length}] (one digit per "
                       f"sub-token), got {y.shape}")
    return y.astype(xp.int32)

  def _value(self, y: Array) -> Array:
    """sum_j clip(y_j) * place_j int32 [...]; >= C for every string with a
    nonzero digit at a capped place, exact below C."""
    digits = y.clip(0, self.base - 1)
    return (digits * self._places.astype(np.int32)).sum(axis=-1)

  def is_valid(self, y: Array) -> Array:
    """bool [...]: whether the digit string y [..., l] encodes a class; jittable."""
    y = self._check_digits(y)
    digits_ok = ((y >= 0) & (y < self.base)).all(axis=-1)
    return digits_ok & (self._value(y) < self.num_classes)

  def decode(self, y: Array) -> Array:
    """Classes f^{-1}(y) int32 [...] of digit strings y [..., l].

    Raises ValueError for a string that encodes no class (a digit outside
    [0, b), mask ids included, or a value >= C) when y is concrete; under jit
    such strings decode to arbitrary classes, so check `is_valid`. numpy in,
    numpy out, as in `encode`.
    """
    y = self._check_digits(y)
    if not isinstance(y, jax.core.Tracer):
      num_invalid = int((~self.is_valid(np.asarray(y))).sum())
      if num_invalid:
        raise ValueError(f"y holds {num_invalid} digit strings that encode no "
                         f"class of {self!r}")
    value = self._value(y).clip(0, self.num_classes - 1)
    return _array_module(y).take(self._class_of_value, value, axis=0)


def _check_codec(codec: Codec) -> None:
  if not isinstance(codec, Codec):
    raise ValueError(f"codec must be a prime.Codec, got {type(codec).__name__}")


def _array_module(a) -> object:
  """jax.numpy for jax arrays and tracers, numpy for everything else."""
  return jnp if isinstance(a, jax.Array) else np


def allowed_classes(y: Array, codec: Codec) -> Array:
  """Carry-over: bool [..., C], whether class c agrees with every unmasked
  sub-token of y [..., l]."""
  table = jnp.asarray(codec.digit_table)
  allowed = jnp.ones(y.shape[:-1] + (codec.num_classes,), jnp.bool_)
  # One [..., C] comparison per slot: never a [..., C, l] array.
  for j in range(codec.length):
    digit = y[..., j, None]
    allowed &= (digit == codec.mask_id) | (digit == table[:, j])
  return allowed


def carry_over(logits: Array, y: Array, codec: Codec) -> Array:
  """float32 logits [..., C] with -inf on the classes y [..., l] rules out."""
  return jnp.where(allowed_classes(y, codec), logits.astype(jnp.float32), -jnp.inf)


def sub_token_log_prob(logits: Array, y_t: Array, y_0: Array, codec: Codec) -> Array:
  """log mu^{ij}(y_0^{ij}) [..., l] under carry-over from y_t; 0 on revealed slots.

  logits [..., C]; y_t [..., l] a partial masking of the codes y_0 [..., l].
  Short codes (`_gathers_agreement_sets`: l <= 3 at C = 50257) take
  `_agreement_log_prob`, one logsumexp over [..., C] plus a small gather;
  long ones (binary) `_per_slot_log_prob`, one masked logsumexp per slot.
  Neither builds an array above [..., C].
  """
  if _gathers_agreement_sets(codec):
    return _agreement_log_prob(logits, y_t, y_0, codec)
  return _per_slot_log_prob(logits, y_t, y_0, codec)


def _gathers_agreement_sets(codec: Codec) -> bool:
  """Whether `_agreement_log_prob` is the cheaper path.

  It gathers K = (b+1)^l - b^l scattered logits per position, each about 16
  times the cost of one element of a dense pass over [..., C] (measured on
  CPU, benchmarks/prime_loss.py), where the per-slot path pays about l extra
  dense passes: so K <= l C / 16, and the padded code space b^l <= 4 C. At
  C = 50257 that holds for l <= 3, not for l = 4 (K = 14911) nor binary codes.
  """
  base, length, num_classes = codec.base, codec.length, codec.num_classes
  code_space = base**length
  return (code_space <= 4 * num_classes
          and 16 * ((base + 1)**length - code_space) <= length * num_classes)


def _agreement_log_prob(logits: Array, y_t: Array, y_0: Array, codec: Codec) -> Array:
  """`sub_token_log_prob` from agreement sets.

  With U the revealed slots of a position and A_S the logsumexp of the logits
  of the classes whose code agrees with y_0 on the slots S (the carry-over
  allowed set is S = U), log mu^{ij}(y_0^{ij}) = A_{U + {j}} - A_U for a
  masked slot j.
  """
  is_masked = y_t == codec.mask_id
  log_sums = _agreement_log_sums(logits, y_0, codec)
  slot_bits = 1 << jnp.arange(codec.length, dtype=jnp.int32)
  revealed = jnp.where(is_masked, 0, slot_bits).sum(axis=-1, keepdims=True)
  log_mu = (jnp.take_along_axis(log_sums, revealed | slot_bits, axis=-1)
            - jnp.take_along_axis(log_sums, revealed, axis=-1))
  return jnp.where(is_masked, log_mu, 0.0)


def _agreement_plan(codec: Codec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
  """Host-side index plan of `_agreement_log_sums`, one segment per nonempty S.

  Returns (free_values [K], fixed_places [l, K], class_of_value [b^l],
  segment_sizes): the code value of the k-th gathered logit is free_values[k]
  + sum_j y_0^j fixed_places[j, k], class_of_value maps code values to classes
  (values >= C encode none and get class 0), and segment s (subset id
  s + 1, bit j = slot j) holds b^(l - |S|) entries.
  """
  base, length = codec.base, codec.length
  places = base**np.arange(length - 1, -1, -1, dtype=np.int64)
  free_values, fixed_places, segment_sizes = [], [], []
  for subset in range(1, 2**length):
    in_subset = (subset >> np.arange(length)) & 1 == 1
    # Every combination of the free digits, row-major over the free slots.
    values = np.zeros((), np.int64)
    for place in places[~in_subset]:
      values = values[..., None] + np.arange(base) * place
    values = values.ravel()
    free_values.append(values)
    fixed_places.append(np.repeat((places * in_subset)[:, None], len(values), axis=1))
    segment_sizes.append(len(values))
  class_of_value = np.zeros(base**length, np.int32)
  class_of_value[:codec.num_classes] = codec._class_of_value
  return (np.concatenate(free_values).astype(np.int32),
          np.concatenate(fixed_places, axis=1).astype(np.int32), class_of_value,
          segment_sizes)


def _agreement_log_sums(logits: Array, y_0: Array, codec: Codec) -> Array:
  """A_S float32 [..., 2^l]: logsumexp of the logits [..., C] of the classes
  whose code agrees with y_0 [..., l] on the slots S (bit j of S = slot j).

  A_{} is the full logsumexp. For nonempty S the agreeing classes are, in the
  class axis ordered by code value and padded to b^l (-inf beyond C) and
  viewed as [b] * l, the slice at y_0's digits along the S axes: one gather
  of sum_{S nonempty} b^(l - |S|) = (b+1)^l - b^l logits reads them all.
  """
  logits = logits.astype(jnp.float32)
  free_values, fixed_places, class_of_value, segment_sizes = _agreement_plan(codec)
  y_0 = y_0.astype(jnp.int32)
  values = jnp.asarray(free_values)
  for j in range(codec.length):
    values = values + y_0[..., j, None] * jnp.asarray(fixed_places[j])
  # Values >= C (padding) read class 0 (or C - 1) and are masked to -inf.
  if codec.shuffle_seed is None:
    classes = jnp.minimum(values, codec.num_classes - 1)
  else:
    classes = jnp.take(jnp.asarray(class_of_value), values, mode="clip")
  gathered = jnp.take_along_axis(logits, classes, axis=-1, mode="promise_in_bounds")
  gathered = jnp.where(values < codec.num_classes, gathered, -jnp.inf)
  segments = jnp.split(gathered, np.cumsum(segment_sizes)[:-1], axis=-1)
  log_sums = [jax.nn.logsumexp(logits, axis=-1)]
  log_sums += [jax.nn.logsumexp(segment, axis=-1) for segment in segments]
  return jnp.stack(log_sums, axis=-1)


def _per_slot_log_prob(logits: Array, y_t: Array, y_0: Array, codec: Codec) -> Array:
  """`sub_token_log_prob` by one masked logsumexp over the allowed classes
  whose j-th digit is the true one per slot j: O(C l) per position."""
  allowed_logits = carry_over(logits, y_t, codec)
  log_norm = jax.nn.logsumexp(allowed_logits, axis=-1)
  table = jnp.asarray(codec.digit_table)
  log_marginals = [
      jax.nn.logsumexp(jnp.where(table[:, j] == y_0[..., j, None],
                                 allowed_logits, -jnp.inf), axis=-1)
      for j in range(codec.length)
  ]
  return jnp.stack(log_marginals, axis=-1) - log_norm[..., None]


def loss(predict_fn: checks.PredictFn,
         x: Array,
         rng: Array,
         *,
         codec: Codec,
         schedule: schedule_lib.Schedule,
         cont_time: bool = True,
         timesteps: int = 1000,
         antithetic: bool = True,
         objective: str = "nelbo") -> tuple[Array, dict[str, Array]]:
  """Monte-Carlo sub-token NELBO of x [B, L, ...] in nats per sequence.

  Args:
    predict_fn: (y [B, L, ..., l] int32 with mask id b, t [B]) -> logits
      [B, L, ..., C].
    x: int classes [B, L, ...] in {0..C-1}.
    rng: a PRNG key (split as in `diffusion.loss`).
    codec: the sub-token codec.
    schedule: the masking schedule of every sub-token.
    cont_time, timesteps, antithetic: as in `diffusion.loss`.
    objective: "nelbo" returns the valid bound; "joint" returns the per-token
      surrogate -w(t) sum_i -log p(x^i | y_t) + recon + prior, a training
      objective that is not a bound (module docstring).

  Returns:
    `loss_given_state` at a draw of t and of the sub-token states y_t.
  """
  _check_codec(codec)
  rng_t, rng_mask = jax.random.split(rng)
  t = diffusion.sample_times(rng_t, x.shape[0], antithetic)
  if not cont_time:
    t = diffusion.discretise(t, timesteps)
  y_t = diffusion.mask_tokens(rng_mask, codec.encode(x), schedule.alpha(t), codec.mask_id)
  return loss_given_state(predict_fn, x, y_t, t, codec=codec, schedule=schedule,
                          cont_time=cont_time, timesteps=timesteps, objective=objective)


def loss_given_state(predict_fn: checks.PredictFn,
                     x: Array,
                     y_t: Array,
                     t: Array,
                     *,
                     codec: Codec,
                     schedule: schedule_lib.Schedule,
                     cont_time: bool = True,
                     timesteps: int = 1000,
                     objective: str = "nelbo") -> tuple[Array, dict[str, Array]]:
  """The loss of x [B, L, ...] at times t [B] and sub-token states y_t [B, L, ..., l].

  `loss` is this at a draw of (t, y_t); its expectation over them is the
  NELBO (or the surrogate's mean). In discrete time t must lie on the grid i / T.

  Returns:
    (loss [B], aux): aux["nelbo"] is the valid bound per sequence [B] whatever
    the objective (equal to loss for "nelbo"); its other entries are scalars
    (batch means): loss_diffusion, loss_recon, loss_prior and bits_per_token
    (NELBO / (L ln 2), per original token) of the valid bound,
    masked_fraction (of sub-tokens), and loss_surrogate with objective "joint".
  """
  if objective not in OBJECTIVES:
    raise ValueError(
        f"unknown objective {objective!r}; valid objectives: {', '.join(OBJECTIVES)}")
  _check_codec(codec)
  checks.tokens(x, codec.num_classes)
  checks.timesteps(cont_time, timesteps)
  batch_size = x.shape[0]
  num_tokens = math.prod(x.shape[1:])
  y_0 = codec.encode(x)
  logits = checks.logits(predict_fn(y_t, t), x.shape + (codec.num_classes,))
  is_masked = y_t == codec.mask_id
  log_mu = sub_token_log_prob(logits, y_t, y_0, codec)
  masked_nll = -jnp.where(is_masked, log_mu, 0.0).reshape(batch_size, -1).sum(axis=-1)
  weight = diffusion.time_weight(schedule, t, cont_time, timesteps)
  loss_diffusion = weight * masked_nll
  num_sub_tokens = num_tokens * codec.length
  loss_recon = diffusion.reconstruction(schedule, num_sub_tokens, codec.base)
  loss_prior = diffusion.prior(schedule, num_sub_tokens, codec.base)
  nelbo = loss_diffusion + loss_recon + loss_prior
  aux = {
      "nelbo": nelbo,
      "loss_diffusion": loss_diffusion.mean(),
      "loss_recon": loss_recon,
      "loss_prior": loss_prior,
      "bits_per_token": nelbo.mean() / (num_tokens * math.log(2)),
      "masked_fraction": is_masked.mean(),
  }
  if objective == "nelbo":
    return nelbo, aux
  token_log_prob = diffusion.token_log_prob(carry_over(logits, y_t, codec), x)
  # Tokens with a masked sub-token; a fully revealed one has log p = 0 anyway.
  token_nll = -jnp.where(is_masked.any(axis=-1), token_log_prob, 0.0)
  surrogate = (weight * token_nll.reshape(batch_size, -1).sum(axis=-1)
               + loss_recon + loss_prior)
  aux["loss_surrogate"] = surrogate.mean()
  return surrogate, aux


def sample_sub_tokens(predict_fn: checks.PredictFn,
                      rng: Array,
                      *,
                      shape: tuple[int, ...],
                      codec: Codec,
                      schedule: schedule_lib.Schedule,
                      steps: int,
                      grid: str = "cosine",
                      top_p: float | None = None,
                      prefix: Array | None = None,
                      infill: tuple[Array, Array] | None = None,
                      reuse_outputs: bool = False) -> tuple[Array, Array]:
  """Prime sampler (module docstring): (final sub-token states int32 [*shape, l], nfe int32 []).

  Every state is a valid code (`codec.is_valid` holds everywhere). Arguments
  as in `sample`.
  """
  shape, y_init, allowed_logits = _sampler_setup(predict_fn, rng, shape, codec, schedule,
                                                 top_p, prefix, infill, reuse_outputs)
  batch_size = shape[0]
  times = jnp.asarray(sampler_lib.time_grid(steps, grid))
  reveal_probs = sampler_lib.reveal_probs(schedule, times)
  table = jnp.asarray(codec.digit_table)

  def step(i: Array, carry: sampler_lib.Carry) -> sampler_lib.Carry:
    y = carry.state
    logits, nfe = sampler_lib.network_output(
        carry, lambda y: allowed_logits(y, jnp.full((batch_size,), times[i])), reuse_outputs)
    rng_draw, rng_reveal = jax.random.split(jax.random.fold_in(rng, i))
    x_hat = draws.categorical(rng_draw, sampler_lib.top_p_log_probs(logits, top_p))
    reveal = draws.bernoulli(rng_reveal, reveal_probs[i], y.shape)
    y_next = jnp.where((y == codec.mask_id) & reveal, table[x_hat], y)

    def fill(y: Array) -> Array:
      # x_hat stays allowed, so the argmax is over a nonempty finite set.
      best = jnp.argmax(carry_over(logits, y, codec), axis=-1)
      return jnp.where(y == codec.mask_id, table[best], y)

    y_next = jax.lax.cond(i == steps - 1, fill, lambda y: y, y_next)
    return sampler_lib.advance(y, y_next, logits, nfe, codec.mask_id, reuse_outputs)

  init = sampler_lib.initial_carry(y_init, shape + (codec.num_classes,), codec.mask_id,
                                   reuse_outputs)
  final = jax.lax.fori_loop(0, steps, step, init)
  return final.state, final.nfe


def _sampler_setup(predict_fn, rng, shape, codec, schedule, top_p, prefix, infill,
                   reuse_outputs):
  """(shape, the initial sub-token state [*shape, l], (y, t [B]) -> carried-over logits)."""
  _check_codec(codec)
  sampler_lib.check_args(rng, shape, codec.num_classes, schedule, top_p)
  shape = tuple(int(d) for d in shape)
  table = jnp.asarray(codec.digit_table)
  given, template = sampler_lib.given_positions(shape, codec.num_classes, prefix, infill)
  # Given positions start with every sub-token revealed; the rest fully masked.
  y_init = jnp.where(given[..., None], table[template], codec.mask_id).astype(jnp.int32)
  if reuse_outputs:
    sampler_lib.check_ignores_time(predict_fn, y_init)

  def allowed_logits(y: Array, t: Array) -> Array:
    logits = predict_fn(y, t.astype(jnp.float32))
    return carry_over(checks.logits(logits, shape + (codec.num_classes,)), y, codec)

  return shape, y_init, allowed_logits


def sample_ordered(predict_fn: checks.PredictFn,
                   rng: Array,
                   *,
                   shape: tuple[int, ...],
                   codec: Codec,
                   schedule: schedule_lib.Schedule,
                   steps: int,
                   grid: str = "cosine",
                   top_p: float | None = None,
                   prefix: Array | None = None,
                   infill: tuple[Array, Array] | None = None,
                   reuse_outputs: bool = False,
                   **options) -> tuple[Array, Array]:
  """(tokens [*shape], nfe) by `sampler.ordered_unmasking` over positions.

  A position counts as masked while any of its sub-tokens is; a chosen one
  gets every sub-token of f(x_hat), x_hat drawn under carry-over, so it
  agrees with what was revealed. options: order, temperature,
  choice_temperature, threshold, block_size of `sampler.ordered_unmasking`.
  """
  shape, y_init, allowed_logits = _sampler_setup(predict_fn, rng, shape, codec, schedule,
                                                 top_p, prefix, infill, reuse_outputs)
  table = jnp.asarray(codec.digit_table)
  final = sampler_lib.ordered_unmasking(
      allowed_logits, rng, y_init,
      masked=lambda y: jnp.any(y == codec.mask_id, axis=-1),
      reveal=lambda y, chosen, values: jnp.where(chosen[..., None], table[values], y),
      mask_id=codec.mask_id, logits_shape=shape + (codec.num_classes,), schedule=schedule,
      steps=steps, grid=grid, top_p=top_p, reuse_outputs=reuse_outputs, **options)
  return codec.decode(final.state), final.nfe


def sample_first_hitting(predict_fn: checks.PredictFn,
                         rng: Array,
                         *,
                         shape: tuple[int, ...],
                         codec: Codec,
                         schedule: schedule_lib.Schedule,
                         top_p: float | None = None,
                         prefix: Array | None = None,
                         infill: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
  """(tokens [*shape], nfe) by `sampler.first_hitting_loop` over the l L sub-tokens.

  The chosen sub-token j of position i gets f(x_hat^i)_j, x_hat^i drawn
  under carry-over: a draw from its marginal mu^{ij}. nfe = l times the
  generated positions.
  """
  shape, y_init, allowed_logits = _sampler_setup(predict_fn, rng, shape, codec, schedule,
                                                 top_p, prefix, infill, False)
  table = jnp.asarray(codec.digit_table)
  final = sampler_lib.first_hitting_loop(
      allowed_logits, rng, y_init, mask_id=codec.mask_id, entries=lambda values: table[values],
      logits_shape=shape + (codec.num_classes,), schedule=schedule, top_p=top_p)
  return codec.decode(final.state), final.nfe


def sample(predict_fn: checks.PredictFn,
           rng: Array,
           *,
           shape: tuple[int, ...],
           codec: Codec,
           schedule: schedule_lib.Schedule,
           steps: int,
           grid: str = "cosine",
           top_p: float | None = None,
           prefix: Array | None = None,
           infill: tuple[Array, Array] | None = None,
           reuse_outputs: bool = False,
           return_nfe: bool = False) -> Array | tuple[Array, Array]:
  """Samples tokens int32 [B, L, ...] = `shape` in {0..C-1} with the Prime sampler.

  A `lax.fori_loop` of `steps` steps, each one network call (or none, with
  reuse_outputs); callers jit it with the Python arguments static, e.g.
  jax.jit(lambda rng: prime.sample(fn, rng, shape=(B, L), codec=codec,
  schedule=sch, steps=T)). Called eagerly, the final decode also checks every
  code.

  Args:
    predict_fn: (y [B, L, ..., l] int32 with mask id b, t [B] float32) ->
      logits [B, L, ..., C].
    rng: a PRNG key.
    shape: (B, L) for text; every dim after B is a position.
    codec: the sub-token codec.
    schedule: the masking schedule the model was trained with.
    steps: T network steps.
    grid: "uniform" (t_i = 1 - i/T) or "cosine" (t_i = cos(pi/2 i/T)).
    top_p: draw x_hat from the renormalised top-p nucleus of p(. | y_t);
      None or 1.0 draws from all of it.
    prefix, infill: positions given from the start, fully unmasked, as in
      `sampler.ancestral`.
    reuse_outputs: skip the network in a step that follows one where no
      sub-token was revealed, as in `sampler.ancestral` (a network that
      reads t is refused).
    return_nfe: also return the network evaluations spent (steps without
      reuse_outputs).

  Returns:
    tokens, or (tokens, nfe int32 []) with return_nfe.
  """
  codes, nfe = sample_sub_tokens(predict_fn, rng, shape=shape, codec=codec,
                                 schedule=schedule, steps=steps, grid=grid, top_p=top_p,
                                 prefix=prefix, infill=infill, reuse_outputs=reuse_outputs)
  tokens = codec.decode(codes)
  return (tokens, nfe) if return_nfe else tokens
