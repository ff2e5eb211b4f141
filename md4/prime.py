"""MDM-Prime (Chao et al., 2025): partial masking over sub-tokens.

A codec f (`md4.codec`, re-exported here as `Codec`) writes each token
class c in {0..C-1} as l base-b digits. Each of the l L sub-tokens is masked independently with
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
final decode always succeeds. `SubTokens` is this reveal rule as a space
that every sampler of `md4.samplers` it suits walks: ordered unmasking
(MaskGIT, LLaDA, blocks) ranks positions by p(x_hat^i | y_t) and reveals all
sub-tokens of the chosen ones; first-hitting reveals one uniformly chosen
masked sub-token per network call. (The NELBO above is that of a reverse process
revealing sub-tokens independently from mu; in continuous time at most one
sub-token is revealed at once and the two processes coincide.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4 import checks
from md4 import codec as codec_lib
from md4 import diffusion
from md4 import samplers
from md4 import schedule as schedule_lib

Array = jnp.ndarray
Codec = codec_lib.Codec

OBJECTIVES = ("nelbo", "joint")


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
  codec_lib.check(codec)
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
  codec_lib.check(codec)
  checks.tokens(x, codec.num_classes)
  checks.timesteps(cont_time, timesteps)
  batch_size = x.shape[0]
  num_tokens = math.prod(x.shape[1:])
  y_0 = codec.encode(x)
  is_masked = y_t == codec.mask_id

  def position_terms(logits: Array, x: Array, y_t: Array, y_0: Array) -> dict[str, Array]:
    terms = {"log_mu": sub_token_log_prob(logits, y_t, y_0, codec)}
    if objective == "joint":
      terms["token_log_prob"] = diffusion.token_log_prob(carry_over(logits, y_t, codec), x)
    return terms

  terms = diffusion.map_logits(position_terms, predict_fn, y_t, t,
                               x.shape + (codec.num_classes,), x, y_t, y_0)
  masked_nll = -jnp.where(is_masked, terms["log_mu"], 0.0).reshape(batch_size, -1).sum(axis=-1)
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
  # Tokens with a masked sub-token; a fully revealed one has log p = 0 anyway.
  token_nll = -jnp.where(is_masked.any(axis=-1), terms["token_log_prob"], 0.0)
  surrogate = (weight * token_nll.reshape(batch_size, -1).sum(axis=-1)
               + loss_recon + loss_prior)
  aux["loss_surrogate"] = surrogate.mean()
  return surrogate, aux


class SubTokens(diffusion.Tokens):
  """Prime's sampling space (`md4.samplers.Space`): sub-tokens [B, *P, l] with mask id b.

  The network's logits over the C classes are carried over (`carry_over`);
  a position drawing x_hat reveals each masked sub-token j as f(x_hat)_j
  with MD4's probability (alpha_s - alpha_t) / (1 - alpha_t). Carry-over
  keeps every state consistent with some class, so the final decode always
  succeeds. ReMDM's remasking is not derived for partial masking.
  """

  features = frozenset({"one_schedule"})

  def __init__(self, codec: Codec, schedule: schedule_lib.Schedule):
    codec_lib.check(codec)
    super().__init__(codec.num_classes, schedule)
    self.codec = codec
    self.mask_id = codec.mask_id
    self.entry_shape = (codec.length,)

  def entries(self, values: Array) -> Array:
    return jnp.asarray(self.codec.digit_table)[values]

  def decode(self, state: Array) -> Array:
    return self.codec.decode(state)

  def allowed_logits(self, logits: Array, state: Array) -> Array:
    return carry_over(logits, state, self.codec)


def sample(predict_fn: checks.PredictFn, rng: Array, *, shape: tuple[int, ...], codec: Codec,
           schedule: schedule_lib.Schedule, steps: int, **options) -> Array:
  """Tokens int32 [B, L, ...] = `shape` in {0..C-1} from the Prime ancestral sampler.

  predict_fn: (y [B, L, ..., l] int32 with mask id b, t [B] float32) ->
  logits [B, L, ..., C]; options (grid, top_p, prefix, infill,
  reuse_outputs) as in `sampler.ancestral`. `md4.samplers.sample("ancestral",
  ..., SubTokens(codec, schedule))` also gives the network evaluations spent.
  Called eagerly, the final decode also checks every code.
  """
  return samplers.sample("ancestral", predict_fn, rng, SubTokens(codec, schedule), shape=shape,
                         steps=steps, **options).tokens
