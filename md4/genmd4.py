"""GenMD4: masked diffusion with a learnable, state-dependent schedule.

Shi et al. (2024), "Simplified and Generalized Masked Diffusion for Discrete
Data", section 6. Every vocabulary value v has its own schedule

    alpha_t(v) = 1 - (1 - eps) t^{w_v},    w = softplus(phi) > 0 learnable,

and position i is masked at time t with probability 1 - alpha_t(x^i) =
(1 - eps) t^{w_{x^i}}, so alpha_0(v) = 1 and alpha_1(v) = eps for every v.

Reverse model. From the forward process, for a masked position and s < t,

    q(z_s = x | z_t = m, x) = (alpha_s(x) - alpha_t(x)) / (1 - alpha_t(x))
                            = 1 - (s / t)^{w_x},    else z_s = m.

The model replaces the unknown x by the network's mu = softmax(logits),
linearly: p(z_s | z_t) = sum_x mu(x) q(z_s | z_t, x). With mu the exact
posterior q(x^i | z_t), this is the true reverse marginal q(z_s | z_t): the
reveal probability depends on the value, so the posterior of a masked
position is the data's conditional tilted by 1 - alpha_t(x) ∝ t^{w_x}, and the
network must learn that tilt. The sampler draws x_hat ~ mu, then reveals
x_hat with probability 1 - (s / t)^{w_{x_hat}}. Since alpha_0(v) = 1, the
last step (s = 0) reveals every position still masked: none is left over.

NELBO. The KL between q(z_s | z_t, x) and p(z_s | z_t) over s = t - dt, per
masked position, gives with alpha'_t(v) / (1 - alpha_t(v)) = -w_v / t

    sum_v (-w_v / t) [(log mu[x] + 1) delta(v = x) - mu[v]]
      = (1 / t) [sum_v w_v mu[v] - w_x (log mu[x] + 1)]  >= 0

(a generalised KL between w_x delta_x and w * mu; with all w_v = w it is
MD4's (w / t)(-log mu[x])). Then

    NELBO(x) = int_{t_1}^1 E_q[sum_{i: z_t^i = m} integrand_i] dt + recon + prior,
    recon    = sum_i (1 - alpha_{t_1}(x^i)) (-log r(x^i)),  r(v) ∝ t_1^{w_v},
    prior    = L eps log V,

recon coding each position masked at t_1 with r, the posterior under a
uniform prior (no network call), and prior the KL at t = 1 from q(z_1 | x)
(eps of the mass unmasked) to p(z_1) = (1 - eps) delta(m) + eps Uniform(V).
t ~ U[t_1, 1] estimates the integral as (1 - t_1) times the integrand.

Gradients. The masking depends on w, so two masked copies z^1, z^2 at the same
t give the REINFORCE leave-one-out term
1/2 sg(L^1 - L^2) (log q(z^1 | x) - log q(z^2 | x)); the pathwise gradient in
w flows through the weights w_v / t and the recon term. `loss` returns the
surrogate to differentiate apart from the NELBO to report; their values agree
(the REINFORCE term enters as r - sg(r)), their gradients do not.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4 import checks
from md4 import diffusion
from md4 import draws
from md4 import schedule as schedule_lib

Array = jnp.ndarray


def mask_prob(t: Array, power_x: Array, eps: float) -> Array:
  """1 - alpha_t(x) = (1 - eps) t^{w_x}; t [B] broadcast over power_x [B, ...]."""
  t = jnp.reshape(t, t.shape + (1,) * (power_x.ndim - t.ndim))
  return (1.0 - eps) * t**power_x


def mask_tokens(rng: Array, x: Array, t: Array, power: Array, eps: float,
                vocab_size: int) -> Array:
  """Forward process: masks x [B, ...] at times t [B], position i w.p. 1 - alpha_t(x^i)."""
  masked = draws.bernoulli(rng, mask_prob(t, power[x], eps), x.shape)
  return jnp.where(masked, vocab_size, x).astype(jnp.int32)


def log_q(z: Array, x: Array, t: Array, power: Array, eps: float,
          vocab_size: int) -> Array:
  """log q(z_t | x) [B] of masked copies z [B, ...] of x at times t [B]."""
  power_x = power[x]
  log_t = jnp.log(jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim)))
  log_masked = math.log1p(-eps) + power_x * log_t
  # log1p keeps log alpha accurate where the mask probability is tiny.
  log_kept = jnp.log1p(-mask_prob(t, power_x, eps))
  per_token = jnp.where(z == vocab_size, log_masked, log_kept)
  return per_token.reshape(x.shape[0], -1).sum(axis=-1)


def integrand(logits: Array, x: Array, z: Array, power: Array, vocab_size: int) -> Array:
  """t times the integrand per position [B, ...]: sum_v w_v mu[v] - w_x (log mu[x] + 1)
  where z is masked, 0 elsewhere; logits [B, ..., V]. Position by position, so that
  `diffusion.map_logits` can make the logits a chunk at a time."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_prob_x = jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]
  expected_power = jnp.einsum("...v,v->...", jnp.exp(log_probs), power)
  per_token = expected_power - power[x] * (log_prob_x + 1.0)
  return jnp.where(z == vocab_size, per_token, 0.0)


def reconstruction(x: Array, power: Array, t1: float, eps: float) -> Array:
  """sum_i (1 - alpha_{t1}(x^i)) (-log r(x^i)), r(v) ∝ t1^{w_v} [B]."""
  log_t1 = math.log(t1)
  log_r = power * log_t1 - jax.nn.logsumexp(power * log_t1)
  per_token = -(1.0 - eps) * jnp.exp(power[x] * log_t1) * log_r[x]
  return per_token.reshape(x.shape[0], -1).sum(axis=-1)


def prior(num_tokens: int, vocab_size: int, eps: float) -> float:
  """L eps log V: KL from q(z_1 | x) to (1 - eps) delta(m) + eps Uniform(V)."""
  return num_tokens * eps * math.log(vocab_size)


def diffusion_loss(predict_fn: checks.PredictFn,
                   x: Array,
                   t: Array,
                   rng: Array,
                   *,
                   power: Array,
                   vocab_size: int,
                   eps: float = 1e-4,
                   single_sample: bool = False) -> tuple[Array, Array, Array]:
  """The diffusion integrand at times t [B] from two masked copies of x [B, ...].

  Copy k in {0, 1} is `mask_tokens(jax.random.split(rng)[k], ...)`.

  Returns (surrogate [B], estimate [B], masked_fraction []). estimate is
  1/2 (L^1 + L^2), L^k = integrand of copy k; surrogate has the same value
  and the gradient to follow: in w pathwise plus REINFORCE leave-one-out, in
  the network 1/2 (grad L^1 + grad L^2), or grad L^1 alone if single_sample
  (copy 2's network output is then under stop_gradient).
  """
  checks.tokens(x, vocab_size)
  _check_power(power, vocab_size)
  _check_eps(eps)
  if jnp.shape(t) != x.shape[:1]:
    raise ValueError(f"t must have shape [B] = {x.shape[:1]}, got {jnp.shape(t)}")
  rng_1, rng_2 = jax.random.split(rng)
  z_1 = mask_tokens(rng_1, x, t, power, eps, vocab_size)
  z_2 = mask_tokens(rng_2, x, t, power, eps, vocab_size)

  def integrand_1(logits: Array, x: Array, z: Array) -> Array:
    if single_sample:
      # Same value, twice the network gradient: with the 1/2 below, grad L^1 in all.
      logits = 2.0 * logits - jax.lax.stop_gradient(logits)
    return integrand(logits, x, z, power, vocab_size)

  def integrand_2(logits: Array, x: Array, z: Array) -> Array:
    if single_sample:
      logits = jax.lax.stop_gradient(logits)
    return integrand(logits, x, z, power, vocab_size)

  logits_shape = x.shape + (vocab_size,)
  losses = [diffusion.map_logits(fn, predict_fn, z, t, logits_shape, x, z)
            for fn, z in ((integrand_1, z_1), (integrand_2, z_2))]
  loss_1, loss_2 = (loss.reshape(x.shape[0], -1).sum(axis=-1) / t for loss in losses)
  estimate = 0.5 * (loss_1 + loss_2)
  reinforce = 0.5 * jax.lax.stop_gradient(loss_1 - loss_2) * (
      log_q(z_1, x, t, power, eps, vocab_size)
      - log_q(z_2, x, t, power, eps, vocab_size))
  surrogate = estimate + reinforce - jax.lax.stop_gradient(reinforce)
  masked_fraction = 0.5 * ((z_1 == vocab_size).mean() + (z_2 == vocab_size).mean())
  return surrogate, estimate, masked_fraction


def loss(predict_fn: checks.PredictFn,
         x: Array,
         rng: Array,
         *,
         power: Array,
         vocab_size: int,
         t1: float = 1e-3,
         eps: float = 1e-4,
         antithetic: bool = True,
         single_sample: bool = False) -> tuple[Array, Array, dict[str, Array]]:
  """GenMD4 NELBO of x [B, L, ...] in nats per sequence, and its surrogate.

  Args:
    predict_fn: (z [B, ...] int32 with mask id V, t [B] float32) -> logits
      [B, ..., V].
    x: int token ids [B, L, ...] in {0..V-1}.
    rng: a PRNG key.
    power: the exponents w [V] > 0 (e.g. `LearnedPolySchedule` output).
    vocab_size: V; the mask id is V.
    t1: times are drawn on [t1, 1]; below t1 the recon term codes x.
    eps: alpha_1(v) = eps.
    antithetic: antithetic times over the batch.
    single_sample: the network gradient from the first masked copy only (MD4's
      cost); the schedule's gradient still uses both copies.

  Returns:
    (surrogate [B], nelbo [B], aux). Differentiate surrogate.mean(); report
    nelbo. Both have the same value. aux scalars: loss_diffusion, loss_recon,
    loss_prior, bits_per_token (of the NELBO), masked_fraction, power_min,
    power_mean, power_max.
  """
  checks.tokens(x, vocab_size)
  _check_power(power, vocab_size)
  if not isinstance(t1, (float, int)) or not 0.0 < t1 < 1.0:
    raise ValueError(f"t1 must be a number in (0, 1), got {t1!r}")
  _check_eps(eps)
  batch_size = x.shape[0]
  num_tokens = math.prod(x.shape[1:])
  power = jnp.asarray(power, jnp.float32)
  rng_t, rng_mask = jax.random.split(rng)
  t = t1 + (1.0 - t1) * diffusion.sample_times(rng_t, batch_size, antithetic)
  surrogate, estimate, masked_fraction = diffusion_loss(
      predict_fn, x, t, rng_mask, power=power, vocab_size=vocab_size, eps=eps,
      single_sample=single_sample)
  # t ~ U[t1, 1] has density 1 / (1 - t1).
  loss_diffusion = (1.0 - t1) * estimate
  loss_recon = reconstruction(x, power, t1, eps)
  loss_prior = prior(num_tokens, vocab_size, eps)
  nelbo = loss_diffusion + loss_recon + loss_prior
  surrogate = (1.0 - t1) * surrogate + loss_recon + loss_prior
  aux = {
      "loss_diffusion": loss_diffusion.mean(),
      "loss_recon": loss_recon.mean(),
      "loss_prior": jnp.float32(loss_prior),
      "bits_per_token": nelbo.mean() / (num_tokens * math.log(2)),
      "masked_fraction": masked_fraction,
      "power_min": power.min(),
      "power_mean": power.mean(),
      "power_max": power.max(),
  }
  return surrogate, nelbo, aux


class ValueTokens(diffusion.Tokens):
  """GenMD4's sampling space (`md4.samplers.Space`): tokens [B, *P] with mask id V.

  A masked position drawing x_hat is revealed from t to s with probability
  1 - (s / t)^{w_x_hat} (module docstring); s = 0 reveals every one. The
  schedule only paces the samplers that reveal by counts (ordered
  unmasking); ReMDM and first-hitting, which need one schedule for every
  value, are not offered.
  """

  features = frozenset()

  def __init__(self, vocab_size: int, power: Array, schedule: schedule_lib.Schedule):
    _check_power(power, vocab_size)
    super().__init__(vocab_size, schedule)
    self.power = jnp.asarray(power, jnp.float32)

  def reveal_prob(self, t: Array, s: Array, values: Array) -> Array:
    return 1.0 - (s / t)**self.power[values]


def _check_power(power: Array, vocab_size: int) -> None:
  """Raises ValueError unless power is a float [V], positive when concrete."""
  if jnp.shape(power) != (vocab_size,):
    raise ValueError(f"power must have shape [V] = ({vocab_size},), got "
                     f"{jnp.shape(power)}")
  if not jnp.issubdtype(jnp.asarray(power).dtype, jnp.floating):
    raise ValueError(f"power must be a float array, got dtype {jnp.asarray(power).dtype}")
  # numpy: a concrete power closed over inside a trace stays concrete.
  if not isinstance(power, jax.core.Tracer) and not np.all(np.asarray(power) > 0):
    raise ValueError(f"power must be positive, got min {np.min(np.asarray(power))}")


def _check_eps(eps: float) -> None:
  if not isinstance(eps, (float, int)) or not 0.0 <= eps < 1.0:
    raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
