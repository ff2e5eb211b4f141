"""Wall-clock seconds of a compiled function's calls, shared by the kernel benchmarks."""

import time
from typing import Callable

import jax


def call_seconds(fn: Callable, *args, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of fn(*args), after a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times
