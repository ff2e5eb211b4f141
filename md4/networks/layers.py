"""Building blocks shared by the backbones (`transformer`, `unet`, `dit`).

Every parameter carries logical axis names (`nn.with_logical_partitioning`);
the training loop maps them to mesh axes with rules. The names used:

    vocab     rows of the token table (vocab_size + 1, last = mask) and of
              the class-label table (num_classes + 1, last = null); logits
    embed     model / conditioning width
    mlp       hidden width of MLPs and of the adaLN modulation
    heads     attention heads
    head_dim  per-head width
    conv_in   input channels of a convolution (or 1x1 projection)
    conv_out  output channels of a convolution (or 1x1 projection)
    norm      scales and offsets of normalisation layers
    None      spatial kernel axes and the sinusoidal-frequency axis

"vocab", "embed", "mlp", "heads" and "head_dim" mean what they mean in
`md4.networks.transformer`, so one set of rules serves every network.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

Array = jnp.ndarray
Dtype = Any

AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "head_dim", "conv_in",
              "conv_out", "norm")


def partitioned(init: Callable, *names: str | None) -> Callable:
  """`init` whose parameter carries the logical axis `names`."""
  return nn.with_logical_partitioning(init, names)


def default_init(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


def _value_range(x: Array) -> tuple[int, int] | None:
  """(min, max) of x when its values are at hand on this host, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  values = np.asarray(x)
  return int(values.min()), int(values.max())


def check_inputs(z: Array, t: Array, label: Array | None, *, vocab_size: int,
                 num_classes: int) -> None:
  """Raises ValueError naming the argument for malformed network inputs.

  z int [B, H, W, C] in {0..vocab_size} (vocab_size = mask id), t float [B],
  label int [B] in {0..num_classes} (num_classes = null id) or None. Value
  ranges are checked only for concrete (non-traced) arrays.
  """
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
  if not jnp.issubdtype(jnp.asarray(z).dtype, jnp.integer):
    raise ValueError(f"z must hold integer token ids, got dtype {z.dtype}")
  if jnp.ndim(z) != 4:
    raise ValueError(f"z must have shape [B, H, W, C], got {jnp.shape(z)}")
  batch_size = z.shape[0]
  if jnp.shape(t) != (batch_size,):
    raise ValueError(f"t must have shape [B] = ({batch_size},), got {jnp.shape(t)}")
  z_range = _value_range(z)
  if z_range is not None:
    low, high = z_range
    if low < 0 or high > vocab_size:
      raise ValueError(f"z has token ids in [{low}, {high}], outside "
                       f"[0, {vocab_size}] (mask id {vocab_size})")
  if label is None:
    return
  if num_classes == 0:
    raise ValueError("label must be None for an unconditional network "
                     "(num_classes=0)")
  if not jnp.issubdtype(jnp.asarray(label).dtype, jnp.integer):
    raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}")
  if jnp.shape(label) != (batch_size,):
    raise ValueError(
        f"label must have shape [B] = ({batch_size},), got {jnp.shape(label)}")
  label_range = _value_range(label)
  if label_range is not None:
    low, high = label_range
    if low < 0 or high > num_classes:
      raise ValueError(f"label has ids in [{low}, {high}], outside "
                       f"[0, {num_classes}] (null id {num_classes})")


def timestep_embedding(t: Array, dim: int, scale: float = 1000.0,
                       max_period: float = 10_000.0) -> Array:
  """Sinusoidal features [B, dim] of t [B] (t scaled to [0, scale] first)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = scale * t.astype(jnp.float32)[:, None] * freqs[None, :]
  features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(features, ((0, 0), (0, dim - 2 * half)))


def dense(x: Array, kernel: Array, num_in_axes: int = 1) -> Array:
  """x [..., *in] times kernel [*in, *out] -> [..., *out], `in` the last num_in_axes axes of x.

  On CPU the kernel's gradient transposes the narrower of x and the output
  gradient (see `_cpu_dense`); elsewhere it is autodiff's.
  """
  if jax.default_backend() == "cpu":
    return _cpu_dense(x, kernel, num_in_axes)
  return jnp.tensordot(x, kernel, num_in_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_dense(x: Array, kernel: Array, num_in_axes: int) -> Array:
  """`dense` whose kernel gradient contracts the tokens with the narrower operand first.

  XLA:CPU copies the first operand of this contraction transposed. Autodiff
  puts the output gradient first: for the MLP's input projections a [T, F]
  copy, into which XLA fused the activation's gradient as a slow transposing
  loop, where x^T is [D, T]. With MlpIn's separate halves, autodiff's order
  made the shrunk text8 step 25% slower than one matmul did, and this order
  5-12% faster.
  """
  return _cpu_dense_fwd(x, kernel, num_in_axes)[0]


def _cpu_dense_fwd(x: Array, kernel: Array, num_in_axes: int) -> tuple[Array, tuple[Array, Array]]:
  return jnp.tensordot(x, kernel, num_in_axes), (x, kernel)


def _cpu_dense_bwd(num_in_axes: int, residuals: tuple[Array, Array],
                   g: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  num_out_axes = kernel.ndim - num_in_axes
  tokens = tuple(range(x.ndim - num_in_axes))
  dx = jnp.tensordot(g, kernel, (tuple(range(g.ndim - num_out_axes, g.ndim)),
                                 tuple(range(num_in_axes, kernel.ndim))))
  if math.prod(kernel.shape[:num_in_axes]) <= math.prod(kernel.shape[num_in_axes:]):
    dkernel = jnp.tensordot(x, g, (tokens, tokens))
  else:
    dkernel = jnp.moveaxis(jnp.tensordot(g, x, (tokens, tokens)),
                           tuple(range(num_out_axes)), tuple(range(num_in_axes, kernel.ndim)))
  return dx, dkernel


_cpu_dense.defvjp(_cpu_dense_fwd, _cpu_dense_bwd)


@jax.custom_vjp
def xla_attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention of q, k, v [B, L, H, D] -> [B, L, H, D], scores in float32.

  What jax.nn.dot_product_attention's XLA path computes, faster to differentiate
  on CPU: every matmul, forward and backward, multiplies [M, K] by [K, N] per
  (batch, head). The small [B, H, L, D] operands are transposed for that,
  behind optimisation barriers so that XLA cannot fold the transposes back
  into the matmuls; the [B, H, L, L] scores never are. With XLA's own layouts
  some matmuls read the scores as a transposed right operand (at about 25
  GFLOP/s on the CI's 2-core CPU), and attention took about 20% longer.
  """
  return _xla_attention_fwd(q, k, v)[0]


def _xla_attention_fwd(q: Array, k: Array, v: Array) -> tuple[Array, tuple[Array, ...]]:
  # Scaling q [B, L, H, D] is cheaper than scaling the scores [B, H, L, L].
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  q_bhqd, k_bhdk, v_bhkd = jax.lax.optimization_barrier(
      (q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)))
  probs = jax.nn.softmax(
      jnp.einsum("bhqd,bhdk->bhqk", q_bhqd, k_bhdk, preferred_element_type=jnp.float32))
  out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v_bhkd)
  residuals = (q_bhqd, k_bhdk, v_bhkd, probs, out)
  return jax.lax.optimization_barrier(out).transpose(0, 2, 1, 3), residuals


def _xla_attention_bwd(residuals: tuple[Array, ...], g: Array) -> tuple[Array, Array, Array]:
  q_bhqd, k_bhdk, v_bhkd, probs, out = residuals
  g_bhqd, g_bhdq, q_bhdq, k_bhkd, v_bhdk = jax.lax.optimization_barrier(
      (g.transpose(0, 2, 1, 3), g.transpose(0, 2, 3, 1), q_bhqd.swapaxes(2, 3),
       k_bhdk.swapaxes(2, 3), v_bhkd.swapaxes(2, 3)))
  dv_bhdk = jnp.einsum("bhdq,bhqk->bhdk", g_bhdq, probs.astype(g.dtype))
  dprobs = jnp.einsum("bhqd,bhdk->bhqk", g_bhqd, v_bhdk, preferred_element_type=jnp.float32)
  # Softmax's gradient, one pass: probs (dprobs - <g, out>), as <probs, dprobs> = <g, out>.
  row_dot = jnp.sum(g_bhqd.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  dscores = (probs * (dprobs - row_dot)).astype(q_bhqd.dtype)
  scale = jnp.asarray(1.0 / math.sqrt(q_bhqd.shape[-1]), q_bhqd.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", dscores, k_bhkd) * scale
  dk_bhdk = jnp.einsum("bhdq,bhqk->bhdk", q_bhdq, dscores)  # q_bhdq carries the scale.
  return (dq.transpose(0, 2, 1, 3), dk_bhdk.transpose(0, 3, 1, 2),
          dv_bhdk.transpose(0, 3, 1, 2))


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gated_unit(h: Array, activation: Callable[[Array], Array]) -> Array:
  """activation(gate) * up for h [..., 2, F] = (gate, up) stacked -> [..., F].

  The gradient [..., 2, F] is one float32 pass over h and the output gradient.
  On one GPU, for silu, it is a Pallas kernel (`swiglu_grad_pallas`); its
  custom call has no partitioning rule, so with more devices, and elsewhere,
  XLA's version (`_gated_unit_grad`). For text8's [131072, 2, 3072] in bf16 the
  H100 took 1.92 ms for autodiff's gradient and 1.39 ms for either of these,
  which move 4 GB at the 2.9 TB/s of a plain elementwise pass. In the whole
  text8 step XLA's version was 1% slower than the kernel.
  """
  return _gated_unit_fwd(h, activation)[0]


def _gated_unit_fwd(h: Array, activation: Callable[[Array], Array]) -> tuple[Array, Array]:
  return activation(h[..., 0, :]) * h[..., 1, :], h


def _gated_unit_bwd(activation: Callable[[Array], Array], h: Array, g: Array) -> tuple[Array]:
  if (activation is nn.silu and jax.default_backend() == "gpu" and jax.device_count() == 1
      and _swiglu_grad_tiles(h.shape)):
    return (swiglu_grad_pallas(h, g),)
  return (_gated_unit_grad(h, g, activation),)


gated_unit.defvjp(_gated_unit_fwd, _gated_unit_bwd)


def _gated_unit_grad(h: Array, g: Array, activation: Callable[[Array], Array]) -> Array:
  """The gradient [..., 2, F] of gated_unit at h [..., 2, F], output gradient g [..., F].

  One select over the [..., 2, F] result, rather than a concatenate of the two
  halves, which XLA:GPU would not fuse with their shared activation.
  """
  gate, up = h[..., :1, :].astype(jnp.float32), h[..., 1:, :].astype(jnp.float32)
  g = g[..., None, :].astype(jnp.float32)
  value, derivative = jax.jvp(activation, (gate,), (jnp.ones_like(gate),))
  is_gate = jax.lax.broadcasted_iota(jnp.int32, h.shape, h.ndim - 2) == 0
  return jnp.where(is_gate, g * up * derivative, g * value).astype(h.dtype)


# Rows and columns of one program of the SwiGLU gradient kernel.
_SWIGLU_BLOCK = (16, 256)


def _swiglu_grad_tiles(shape: tuple[int, ...]) -> bool:
  return math.prod(shape[:-2]) % _SWIGLU_BLOCK[0] == 0 and shape[-1] % _SWIGLU_BLOCK[1] == 0


def _swiglu_grad_kernel(h_ref, g_ref, dh_ref):
  gate = h_ref[:, 0, :].astype(jnp.float32)
  up = h_ref[:, 1, :].astype(jnp.float32)
  g = g_ref[...].astype(jnp.float32)
  sigmoid = 1.0 / (1.0 + jnp.exp(-gate))
  dh_ref[:, 0, :] = (g * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))).astype(dh_ref.dtype)
  dh_ref[:, 1, :] = (g * gate * sigmoid).astype(dh_ref.dtype)


def swiglu_grad_pallas(h: Array, g: Array, interpret: bool = False) -> Array:
  """`_gated_unit_grad` for silu as one Pallas kernel: h [..., 2, F] and g [..., F] read once."""
  rows, columns = _SWIGLU_BLOCK
  num_tokens, width = math.prod(h.shape[:-2]), h.shape[-1]
  dh = pl.pallas_call(
      _swiglu_grad_kernel,
      grid=(num_tokens // rows, width // columns),
      in_specs=[pl.BlockSpec((rows, 2, columns), lambda i, j: (i, 0, j)),
                pl.BlockSpec((rows, columns), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((rows, 2, columns), lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((num_tokens, 2, width), h.dtype),
      # Triton, the backend it was tuned on: some JAX versions default to Mosaic GPU.
      compiler_params=pltriton.CompilerParams(),
      interpret=interpret,
  )(h.reshape(num_tokens, 2, width), g.reshape(num_tokens, width))
  return dh.reshape(h.shape)


def attention_kernel(requested: str, dtype: Dtype, head_dim: int) -> str:
  """"cudnn" or "xla": the requested kernel, or by default cuDNN's fused one where it applies.

  cuDNN's flash attention (GPU, half precision, head_dim a multiple of 8 up to
  128) never writes the [B, H, L, L] scores to memory; the XLA path does.
  """
  if requested:
    return requested
  if (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return "xla"


def dot_product_attention(q: Array, k: Array, v: Array, implementation: str = "") -> Array:
  """Softmax attention of q, k, v [B, L, H, D] -> [B, L, H, D] by `attention_kernel`'s choice."""
  if attention_kernel(implementation, q.dtype, q.shape[-1]) == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  return xla_attention(q, k, v)


# Tables up to this many rows are read by a one-hot matmul (see Embed).
ONE_HOT_MAX_IDS = 1024


class Embed(nn.Module):
  """nn.Embed (same parameter) whose gradient avoids contended scatter-adds: ids -> [..., features].

  The gradient of a gather is a scatter-add, and where many tokens share few
  rows (27 characters, 257 pixel values) GPU atomics serialise on those rows,
  bf16 ones worst (compare-and-swap loops). Small tables are therefore read by
  a one-hot matmul, whose gradient is a matmul; larger ones are gathered in
  float32, which GPUs add atomically in hardware, and then cast.
  """

  num_embeddings: int
  features: int
  embedding_init: Callable
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param("embedding", self.embedding_init,
                       (self.num_embeddings, self.features), jnp.float32)
    if self.num_embeddings <= ONE_HOT_MAX_IDS:
      one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=self.dtype)
      # HIGHEST: each output is exactly one table entry, also where f32 matmuls default to TF32.
      return jnp.dot(one_hot, table.astype(self.dtype), precision=jax.lax.Precision.HIGHEST)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class TokenEmbed(nn.Module):
  """Embeds each channel's token (table of vocab_size + 1 rows, mask last).

  z int [B, H, W, C] -> [B, H, W, C * features]: the C channel embeddings of a
  pixel are concatenated, so one table serves every channel.
  """

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    table = Embed(
        self.vocab_size + 1, self.features, dtype=self.dtype,
        embedding_init=partitioned(nn.initializers.normal(1.0), "vocab", "embed"),
        name="table")
    x = table(z)
    return x.reshape(z.shape[:-1] + (z.shape[-1] * self.features,))


class ConditionEmbed(nn.Module):
  """Time (and class) conditioning vector [B, features].

  sinusoidal(t) -> Dense -> swish -> Dense, plus a learned class embedding
  when num_classes > 0 (label None means the null class num_classes).
  """

  features: int
  frequency_dim: int = 256
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, label: Array | None) -> Array:
    h = timestep_embedding(t, self.frequency_dim).astype(self.dtype)
    h = nn.Dense(self.features, dtype=self.dtype,
                 kernel_init=partitioned(default_init(), None, "mlp"),
                 bias_init=partitioned(nn.initializers.zeros, "mlp"),
                 name="time_in")(h)
    h = nn.Dense(self.features, dtype=self.dtype,
                 kernel_init=partitioned(default_init(), "mlp", "embed"),
                 bias_init=partitioned(nn.initializers.zeros, "embed"),
                 name="time_out")(nn.swish(h))
    if self.num_classes == 0:
      return h
    if label is None:
      label = jnp.full(t.shape, self.num_classes, jnp.int32)
    label_table = nn.Embed(
        self.num_classes + 1, self.features, dtype=self.dtype,
        embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
        name="label")
    return h + label_table(label)


class SelfAttention(nn.Module):
  """Multi-head self-attention over x [B, N, D] -> [B, N, D].

  Softmax attention by `dot_product_attention` (attention_impl: "" picks,
  or "xla" / "cudnn"). zero_init_out
  starts the output projection at zero (an ungated residual branch then starts
  as identity); leave it off behind a zero-initialised gate, where two zeros
  in a row would leave both without gradient.
  """

  num_heads: int
  zero_init_out: bool = False
  attention_impl: str = ""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the attention "
                       f"width {width}")
    head_dim = width // self.num_heads

    def projection(name: str) -> Array:
      return nn.DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype,
          kernel_init=partitioned(default_init(), "embed", "heads", "head_dim"),
          bias_init=partitioned(nn.initializers.zeros, "heads", "head_dim"),
          name=name)(x)

    q, k, v = projection("query"), projection("key"), projection("value")
    h = dot_product_attention(q, k, v, self.attention_impl)  # [B, N, heads, head_dim]
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype,
        kernel_init=partitioned(
            nn.initializers.zeros if self.zero_init_out else default_init(),
            "heads", "head_dim", "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"),
        name="out")(h)
