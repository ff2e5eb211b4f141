"""MD4 forward masking and NELBO, pure functions over a `predict_fn`.

Data x in {0..V-1}^L, mask id m = V. Forward process, per position:
q(z_t | x) = alpha_t delta(x) + (1 - alpha_t) delta(m). The continuous-time
NELBO (Shi et al., 2024) is

    NELBO(x) = int_0^1 -w(t) E_q[ sum_{i: z_t^i = m} -log mu(z_t, t)_i[x^i] ] dt
               + L (1 - alpha_0) log V + L alpha_1 log V,

with w = alpha' / (1 - alpha). The last two terms code uniformly the tokens
still masked at t = 0 (recon) and the alpha_1 share still unmasked at t = 1
(prior: the KL from q(z_1 | x) to p(z_1) = (1 - alpha_1) delta(m) +
alpha_1 Uniform(V)); without the prior the bound falls below the entropy
wherever that exceeds L log V / 2. With T steps, t = i/T (i uniform in
1..T), s = t - 1/T and -w(t) is replaced by T (alpha_s - alpha_t) / (1 - alpha_t).
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from md4 import checks
from md4 import draws
from md4 import schedule as schedule_lib

Array = jnp.ndarray


def sample_times(rng: Array, batch_size: int, antithetic: bool) -> Array:
  """t uniform on (0, 1) [B]; antithetic draws t_b = (u + b / B) mod 1 for one u.

  Never 0 (1 only by rounding), where poly<k> with k < 1 has an infinite
  weight, and with float32's relative precision down to 2^-64 / B
  (`draws.uniform`), so that the mass of a schedule near t = 0 is not lost
  to a grid (poly0.5 on jax.random.uniform's 2^-23 grid: 2.5e-4 of the bound).
  """
  if not antithetic:
    return draws.uniform(rng, (batch_size,))
  rng_stratum, rng_offset = jax.random.split(rng)
  # u = (stratum + offset) / B: the stratum that lands at 0 keeps offset's precision.
  stratum = jax.random.randint(rng_stratum, (), 0, batch_size)
  offset = draws.uniform(rng_offset, ())
  strata = jnp.mod(jnp.arange(batch_size) + stratum, batch_size)
  return (strata + offset) / batch_size


def mask_tokens(rng: Array, x: Array, alpha: Array, mask_id: int) -> Array:
  """Forward process: keeps each x with probability alpha [B], else mask_id."""
  alpha = jnp.reshape(alpha, alpha.shape + (1,) * (x.ndim - alpha.ndim))
  keep = draws.bernoulli(rng, alpha, x.shape)
  return jnp.where(keep, x, mask_id).astype(jnp.int32)


@jax.custom_vjp
def token_log_prob(logits: Array, x: Array) -> Array:
  """log softmax(logits)[x] float32 [...] for logits [..., V] and x [...].

  The gradient, (one_hot(x) - softmax(logits)) g, is one elementwise pass in
  the logits' dtype: autodiff of the gather would scatter into a float32
  [..., V] zeros array, which then takes two more passes over memory.
  """
  return _token_log_prob_fwd(logits, x)[0]


def _token_log_prob_fwd(logits: Array, x: Array) -> tuple[Array, tuple[Array, Array, Array]]:
  log_norm = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  logit_x = jnp.take_along_axis(logits, x[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return logit_x - log_norm, (logits, x, log_norm)


def _token_log_prob_bwd(residuals: tuple[Array, Array, Array], g: Array) -> tuple[Array, None]:
  logits, x, log_norm = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - log_norm[..., None])
  one_hot = jnp.arange(logits.shape[-1]) == x[..., None]
  return (g[..., None] * (one_hot - probs)).astype(logits.dtype), None


token_log_prob.defvjp(_token_log_prob_fwd, _token_log_prob_bwd)


@dataclasses.dataclass(frozen=True)
class Factored:
  """A predict_fn split before its output layer, so that a loss can make logits a chunk at a time.

  Calling it is head(features(z, t)): it serves wherever a predict_fn does.
  The losses (`map_logits`) instead run features once and the head over
  chunk_size positions at a time (`chunked_map`), so that the logits
  [B, L, V] are never held whole, neither forward nor backward.

  Attributes:
    features: (z [B, L, ...], t [B]) -> features [B, L, D].
    head: features [B, C, D] -> logits float32 [B, C, V], position by position.
    chunk_size: positions per chunk; it divides L (or is at least L: one chunk).
  """

  features: Callable[[Array, Array], Array]
  head: Callable[[Array], Array]
  chunk_size: int

  def __call__(self, z: Array, t: Array) -> Array:
    return self.head(self.features(z, t))


def chunked_map(fn: Callable[..., Any], features: Array, head: Callable[[Array], Array],
                inputs: tuple[Array, ...], chunk_size: int) -> Any:
  """fn(head(features), *inputs) over [B, L], chunk_size positions at a time.

  features [B, L, D]; inputs arrays [B, L, ...]; fn maps the logits [B, C, V]
  of a chunk of C positions and the inputs' chunks [B, C, ...] to a pytree of
  [B, C, ...] arrays, position by position; the result is that pytree over
  [B, L, ...]. Each chunk is rematerialised: the backward pass recomputes its
  logits rather than keep them, so the gradient equals the unchunked one with
  one chunk's logits [B, C, V] live at a time.
  """
  batch_size, length = features.shape[:2]
  chunk_size = min(chunk_size, length)  # A chunk as long as the sequence is all of it.
  if length % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must divide the sequence length {length}")
  num_chunks = length // chunk_size

  def split(array: Array) -> Array:  # [B, L, ...] -> [n, B, C, ...]
    return array.reshape(batch_size, num_chunks, chunk_size, *array.shape[2:]).swapaxes(0, 1)

  def join(array: Array) -> Array:  # [n, B, C, ...] -> [B, L, ...]
    return array.swapaxes(0, 1).reshape(batch_size, length, *array.shape[3:])

  chunk_fn = jax.checkpoint(lambda h, *chunk_inputs: fn(head(h), *chunk_inputs))
  outputs = jax.lax.map(lambda chunk: chunk_fn(*chunk), tuple(map(split, (features, *inputs))))
  return jax.tree.map(join, outputs)


def map_logits(fn: Callable[..., Any], predict_fn: checks.PredictFn, z: Array, t: Array,
               logits_shape: tuple[int, ...], *inputs: Array) -> Any:
  """fn(predict_fn(z, t), *inputs) for logits of logits_shape, checked.

  Where predict_fn is `Factored` and the logits are [B, L, V], `chunked_map`
  makes them a chunk of positions at a time: fn must then work position by
  position on inputs [B, L, ...].
  """
  if isinstance(predict_fn, Factored) and len(logits_shape) == 3:
    return chunked_map(fn, predict_fn.features(z, t), predict_fn.head, inputs,
                       predict_fn.chunk_size)
  return fn(checks.logits(predict_fn(z, t), logits_shape), *inputs)


def target_log_prob(predict_fn: checks.PredictFn, z: Array, t: Array, x: Array,
                    vocab_size: int) -> Array:
  """log mu(z, t)[x] float32 [B, L, ...]: chunked where predict_fn is `Factored` over [B, L]."""
  return map_logits(token_log_prob, predict_fn, z, t, x.shape + (vocab_size,), x)


def time_weight(sch: schedule_lib.Schedule, t: Array, cont_time: bool,
                timesteps: int) -> Array:
  """-w(t) >= 0 in continuous time, T (alpha_s - alpha_t)/(1 - alpha_t) in discrete."""
  if cont_time:
    return -sch.weight(t)
  # t and s from the step's index by the same arithmetic, so that the s of step
  # i is exactly the t of step i - 1 and the weights telescope.
  step = jnp.round(t * timesteps)
  t, s = step / timesteps, (step - 1.0) / timesteps
  # As in Schedule.weight: with eps = 0 both can underflow where nothing is masked.
  mask_prob = jnp.maximum(sch.mask_prob(t), jnp.finfo(jnp.float32).tiny)
  return timesteps * sch.alpha_drop(s, t) / mask_prob


def discretise(t: Array, timesteps: int) -> Array:
  """Maps t in (0, 1] to the grid i / T, i in {1..T}."""
  return jnp.clip(jnp.ceil(t * timesteps), 1.0, timesteps) / timesteps


def reconstruction(sch: schedule_lib.Schedule, num_tokens: int,
                   vocab_size: int) -> Array:
  """L (1 - alpha_0) log V: the tokens masked at t = 0, coded uniformly."""
  return num_tokens * sch.mask_prob(jnp.float32(0.0)) * math.log(vocab_size)


def prior(sch: schedule_lib.Schedule, num_tokens: int, vocab_size: int) -> Array:
  """L alpha_1 log V: the tokens still unmasked at t = 1, coded uniformly."""
  return num_tokens * sch.alpha(jnp.float32(1.0)) * math.log(vocab_size)


def loss(predict_fn: checks.PredictFn,
         x: Array,
         rng: Array,
         *,
         schedule: schedule_lib.Schedule,
         vocab_size: int,
         cont_time: bool = True,
         timesteps: int = 1000,
         antithetic: bool = True) -> tuple[Array, dict[str, Array]]:
  """Monte-Carlo NELBO of x [B, L, ...] in nats per sequence.

  Draws t (`sample_times`, on the grid i / T in discrete time) and z_t
  (`mask_tokens`), then returns `loss_given_state`.
  """
  rng_t, rng_mask = jax.random.split(rng)
  t = sample_times(rng_t, x.shape[0], antithetic)
  if not cont_time:
    t = discretise(t, timesteps)
  z = mask_tokens(rng_mask, x, schedule.alpha(t), vocab_size)
  return loss_given_state(predict_fn, x, z, t, schedule=schedule, vocab_size=vocab_size,
                          cont_time=cont_time, timesteps=timesteps)


def loss_given_state(predict_fn: checks.PredictFn,
                     x: Array,
                     z: Array,
                     t: Array,
                     *,
                     schedule: schedule_lib.Schedule,
                     vocab_size: int,
                     cont_time: bool = True,
                     timesteps: int = 1000) -> tuple[Array, dict[str, Array]]:
  """The NELBO estimate of x [B, L, ...] at times t [B] and masked states z [B, L, ...].

  `loss` is this at a draw of (t, z); its expectation over them is the NELBO.
  In discrete time t must lie on the grid i / T.

  Returns (nelbo [B], aux) with aux scalars: loss_diffusion, loss_recon,
  loss_prior, bits_per_token and masked_fraction (batch means).
  """
  checks.tokens(x, vocab_size)
  checks.timesteps(cont_time, timesteps)
  batch_size = x.shape[0]
  num_tokens = math.prod(x.shape[1:])
  is_masked = (z == vocab_size)
  masked_nll = -jnp.where(is_masked, target_log_prob(predict_fn, z, t, x, vocab_size), 0.0)
  masked_nll = masked_nll.reshape(batch_size, -1).sum(axis=-1)
  loss_diffusion = time_weight(schedule, t, cont_time, timesteps) * masked_nll
  loss_recon = reconstruction(schedule, num_tokens, vocab_size)
  loss_prior = prior(schedule, num_tokens, vocab_size)
  nelbo = loss_diffusion + loss_recon + loss_prior
  aux = {
      "loss_diffusion": loss_diffusion.mean(),
      "loss_recon": loss_recon,
      "loss_prior": loss_prior,
      "bits_per_token": nelbo.mean() / (num_tokens * math.log(2)),
      "masked_fraction": is_masked.mean(),
  }
  return nelbo, aux


class Tokens:
  """MD4's sampling space (`md4.samplers.Space`): tokens [B, *P] with mask id V.

  A masked token is revealed from t to s with probability
  (alpha_s - alpha_t) / (1 - alpha_t), whatever its value.
  """

  entry_shape = ()
  features = frozenset({"one_schedule", "remasking", "frames"})

  def __init__(self, vocab_size: int, schedule: schedule_lib.Schedule):
    self.num_values = vocab_size
    self.mask_id = vocab_size
    self.schedule = schedule

  def entries(self, values: Array) -> Array:
    return jnp.asarray(values, jnp.int32)

  def decode(self, state: Array) -> Array:
    return state

  def allowed_logits(self, logits: Array, state: Array) -> Array:
    del state
    return logits

  def reveal_prob(self, t: Array, s: Array, values: Array) -> Array:
    del values
    # eps = 0 makes 1 - alpha_t vanish only where everything is revealed anyway.
    denominator = jnp.maximum(self.schedule.mask_prob(t), jnp.finfo(jnp.float32).tiny)
    return jnp.clip(self.schedule.alpha_drop(s, t) / denominator, 0.0, 1.0)
