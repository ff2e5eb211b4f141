"""Custom-gradient ops and the Pallas kernel of the backbones, each beside its library op.

Every public op takes `custom_kernels`: True picks, per backend, the custom
VJP or kernel written for it; False the library op with autodiff's gradient
(`jnp.tensordot`, `jax.nn.dot_product_attention`, the elementwise gated unit
and rotation), the same values and gradients up to float rounding. All
backend dispatch of the networks lives here; what the custom ops gained is
recorded in benchmarks/README.md.
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

ROTARY_BASE = 10_000.0


def dense(x: Array, kernel: Array, num_in_axes: int = 1, *, custom_kernels: bool = True) -> Array:
  """x [..., *in] times kernel [*in, *out] -> [..., *out], `in` the last num_in_axes axes of x.

  With custom_kernels, on CPU, the gradient is `_cpu_dense`'s; otherwise autodiff's.
  """
  if custom_kernels and jax.default_backend() == "cpu":
    return _cpu_dense(x, kernel, num_in_axes)
  return jnp.tensordot(x, kernel, num_in_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_dense(x: Array, kernel: Array, num_in_axes: int) -> Array:
  """`dense` whose kernel gradient contracts the tokens with the narrower operand first.

  XLA:CPU copies that contraction's first operand transposed, and autodiff
  puts the wider one there (for the MLP's input, g [T, F] rather than x [T, D]).
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


def gated_dense(x: Array, kernel: Array, activation: Callable[[Array], Array], *,
                custom_kernels: bool = True) -> Array:
  """activation(x kernel[:, 0]) * (x kernel[:, 1]) for x [..., D], kernel [D, 2, F] -> [..., F].

  With custom_kernels, on CPU, two matmuls (XLA:CPU writes the concatenated gradient
  of one three times); elsewhere one matmul, faster, and `gated_unit`'s gradient.
  """
  if custom_kernels and jax.default_backend() == "cpu":
    gate, up = (dense(x, kernel[:, i]) for i in range(2))
    return activation(gate) * up
  h = dense(x, kernel, custom_kernels=custom_kernels)
  return gated_unit(h, activation, custom_kernels=custom_kernels)


def gated_unit(h: Array, activation: Callable[[Array], Array], *,
               custom_kernels: bool = True) -> Array:
  """activation(gate) * up for h [..., 2, F] = (gate, up) stacked -> [..., F].

  With custom_kernels the gradient is `_gated_unit`'s, one pass over h.
  """
  if custom_kernels:
    return _gated_unit(h, activation)
  return activation(h[..., 0, :]) * h[..., 1, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gated_unit(h: Array, activation: Callable[[Array], Array]) -> Array:
  """`gated_unit` whose gradient [..., 2, F] is one float32 pass over h and the output gradient.

  On one GPU, for silu, the Pallas kernel `swiglu_grad_pallas`; elsewhere, and
  with more devices (the kernel's custom call has no partitioning rule), XLA's
  `_gated_unit_grad`. Both run at the speed of a plain elementwise pass.
  """
  return _gated_unit_fwd(h, activation)[0]


def _gated_unit_fwd(h: Array, activation: Callable[[Array], Array]) -> tuple[Array, Array]:
  return gated_unit(h, activation, custom_kernels=False), h


def _gated_unit_bwd(activation: Callable[[Array], Array], h: Array, g: Array) -> tuple[Array]:
  if (activation is nn.silu and jax.default_backend() == "gpu" and jax.device_count() == 1
      and _swiglu_grad_tiles(h.shape)):
    return (swiglu_grad_pallas(h, g),)
  return (_gated_unit_grad(h, g, activation),)


_gated_unit.defvjp(_gated_unit_fwd, _gated_unit_bwd)


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
  """`_gated_unit_grad` for silu as one Pallas kernel: h [..., 2, F] and g [..., F] read once.

  The tokens (h's leading axes) must be a multiple of 16 and F of 256.
  """
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


def dot_product_attention(q: Array, k: Array, v: Array, implementation: str = "", *,
                          custom_kernels: bool = True) -> Array:
  """Softmax attention of q, k, v [B, L, H, D] -> [B, L, H, D] by `attention_kernel`'s choice.

  With custom_kernels the XLA path is `xla_attention`.
  """
  implementation = attention_kernel(implementation, q.dtype, q.shape[-1])
  if custom_kernels and implementation == "xla":
    return xla_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


@jax.custom_vjp
def xla_attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention of q, k, v [B, L, H, D] -> [B, L, H, D], scores in float32.

  jax.nn.dot_product_attention's XLA path with every matmul, forward and
  backward, as [M, K] by [K, N] per (batch, head), as XLA:CPU reads a
  transposed right operand slowly: the small [B, H, L, D] operands are
  transposed, behind optimisation barriers that keep XLA from folding the
  transposes back into the matmuls, and the [B, H, L, L] scores never are.
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


def _rotary_angles(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [L, 1, D/2] of the rotary angles, constants of the program.

  Computed in float64, as float32 angles drift from the true tables at long positions.
  """
  frequencies = ROTARY_BASE**(-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  angles = np.arange(length)[:, None, None] * frequencies
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the pairs (x[..., i], x[..., i + D/2]) of x [B, L, H, D] by the angles, in float32."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def rotary(x: Array, *, custom_kernels: bool = True) -> Array:
  """Rotary position embedding of x [B, L, H, D] (D even) -> [B, L, H, D].

  With custom_kernels the gradient is `_rotary`'s rotation back.
  """
  if custom_kernels:
    return _rotary(x)
  return _rotate(x, *_rotary_angles(x.shape[1], x.shape[-1]))


@jax.custom_vjp
def _rotary(x: Array) -> Array:
  """`rotary` whose gradient is the rotation back, one pass like the forward.

  Autodiff's gradient pads and adds the halves instead.
  """
  return _rotary_fwd(x)[0]


def _rotary_fwd(x: Array) -> tuple[Array, None]:
  return rotary(x, custom_kernels=False), None


def _rotary_bwd(_, g: Array) -> tuple[Array]:
  cos, sin = _rotary_angles(g.shape[1], g.shape[-1])
  return (_rotate(g, cos, -sin),)


_rotary.defvjp(_rotary_fwd, _rotary_bwd)
