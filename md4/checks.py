"""Argument checks shared by the math modules, and the `predict_fn` type they all take.

Each check raises ValueError naming the argument and what it must be. Checks
on values (token ranges) run only where the values are concrete, so every
function stays jittable.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray
# predict_fn(z [B, ...] int32 with the mask id, t [B] float32) -> logits [B, ..., V]
PredictFn = Callable[[Array, Array], Array]


def is_int(value) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(value, name: str) -> None:
  """Raises unless value is an int >= 1."""
  if not is_int(value) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def vocab_size(value: int) -> None:
  if not is_int(value) or value < 1:
    raise ValueError(f"vocab_size must be a positive int, got {value!r}")


def tokens(x: Array, size: int, name: str = "x") -> None:
  """Integer ids [B, L, ...]; when concrete, all in [0, size) (the mask id size is not data)."""
  vocab_size(size)
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {x.dtype}")
  if jnp.ndim(x) < 2:
    raise ValueError(f"{name} must have shape [B, L, ...], got {jnp.shape(x)}")
  if not isinstance(x, jax.core.Tracer):
    values = np.asarray(x)  # NumPy, so that a concrete x closed over inside jit is not traced.
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= size:
      raise ValueError(
          f"{name} has token ids in [{low}, {high}], outside [0, {size}) "
          f"(vocab_size={size}; the mask id {size} is not data)")


def rng(key: Array) -> None:
  """A typed key (jax.random.key) or a raw uint32 PRNGKey."""
  dtype = getattr(key, "dtype", None)
  is_typed_key = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if not is_typed_key and (dtype != jnp.uint32 or jnp.ndim(key) != 1):
    raise ValueError(f"rng must be a PRNG key (jax.random.key or PRNGKey), got "
                     f"{type(key).__name__} of dtype {dtype}")


def shape(value: tuple[int, ...]) -> None:
  """A tuple (B, L, ...) of positive ints."""
  if (not isinstance(value, (tuple, list)) or len(value) < 2
      or not all(is_int(d) and d >= 1 for d in value)):
    raise ValueError(f"shape must be a tuple (B, L, ...) of positive ints, got {value!r}")


def top_p(value: float | None) -> None:
  if value is not None and (
      isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
      or not 0.0 < value <= 1.0):
    raise ValueError(f"top_p must be None or a number in (0, 1], got {value!r}")


def timesteps(cont_time: bool, value: int) -> None:
  """Discrete time needs T >= 1 steps; continuous time ignores T."""
  if not cont_time:
    positive_int(value, "timesteps")


def logits(value: Array, expected: tuple[int, ...]) -> Array:
  """Returns value after checking that predict_fn gave logits of the expected shape."""
  if value.shape != tuple(expected):
    raise ValueError(f"predict_fn returned logits of shape {value.shape}, "
                     f"expected {tuple(expected)}")
  return value
