"""The gated MLP unit's gradient alone, as one JSON object.

python benchmarks/gated_unit.py --tokens=131072 --width=3072   # text8's step, bf16

Times, for h [T, 2, F] and the output gradient g [T, F], the gradient of
silu(gate) * up three ways: autodiff of the split and product (the model's
code before `kernels.gated_unit`), `kernels.gated_unit`'s XLA version, and its
Pallas kernel (GPU only); beside them a plain elementwise pass, 2 h. Each
comes with the bytes it moves per second: the gradient reads h and g and
writes dh (5 T F values), 2 h reads and writes h (4 T F values), so the
plain pass's rate is the memory bound to compare with.
"""

import functools
import json
import statistics

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from md4.networks import kernels
import timing

_TOKENS = flags.DEFINE_integer("tokens", 131072, "T (batch x sequence length).")
_WIDTH = flags.DEFINE_integer("width", 3072, "F, the MLP's hidden width.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Dtype of h and g.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per function (median kept).")


def median_seconds(fn, *args) -> float:
  """Median of `repeats` calls of a compiled fn, after a warm-up call."""
  return statistics.median(timing.call_seconds(fn, *args, repeats=_REPEATS.value))


def autodiff_gated_unit(h: jax.Array) -> jax.Array:
  gate, up = (a[..., 0, :] for a in jnp.split(h, 2, axis=-2))
  return nn.silu(gate) * up


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  tokens, width = _TOKENS.value, _WIDTH.value
  h = jax.random.normal(jax.random.PRNGKey(0), (tokens, 2, width), dtype)
  g = jax.random.normal(jax.random.PRNGKey(1), (tokens, width), dtype)
  functions = {
      "elementwise_2h": jax.jit(lambda h, g: h * 2),
      "autodiff": jax.jit(lambda h, g: jax.vjp(autodiff_gated_unit, h)[1](g)[0]),
      "xla": jax.jit(functools.partial(kernels._gated_unit_grad, activation=nn.silu)),  # pylint: disable=protected-access
  }
  if jax.default_backend() == "gpu":
    functions["pallas"] = jax.jit(kernels.swiglu_grad_pallas)
  seconds = {name: median_seconds(fn, h, g) for name, fn in functions.items()}
  values_moved = {"elementwise_2h": 4 * tokens * width}
  result = {"device": jax.devices()[0].device_kind, "tokens": tokens, "width": width,
            "dtype": dtype.name}
  for name, time_taken in seconds.items():
    moved = values_moved.get(name, 5 * tokens * width) * dtype.itemsize
    result[f"{name}_seconds"] = time_taken
    result[f"{name}_bytes_per_sec"] = moved / time_taken
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
