"""MDM-Prime's codec: token classes as strings of base-b sub-tokens.

A codec f writes each class c in {0..C-1} as l base-b digits (most
significant first), b = ceil(C^(1/l)), optionally after a fixed seeded
permutation of the classes (index shuffling); binary means b = 2 and
l = ceil(log2 C). `md4.prime` masks the sub-tokens and holds the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np

from md4 import checks

Array = jnp.ndarray

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


def check(codec: Codec) -> None:
  """Raises ValueError unless codec is a Codec."""
  if not isinstance(codec, Codec):
    raise ValueError(f"codec must be a prime.Codec, got {type(codec).__name__}")


def _array_module(a) -> object:
  """jax.numpy for jax arrays and tracers, numpy for everything else."""
  return jnp if isinstance(a, jax.Array) else np
