"""Progress bars with an ETA on a terminal's stderr, also for loops inside jitted code.

`bar` opens one (shown on process 0 when stderr is a terminal); `counted`
wraps a predict_fn so that every network call a jitted sampler makes
advances the innermost open bar, through a host callback that does nothing
when no bar is open.
"""

import contextlib
from typing import Callable, Iterator

import jax
import tqdm

_open_bars: list[tqdm.tqdm] = []


@contextlib.contextmanager
def bar(total: int | None, description: str, unit: str, *, enabled: bool = True,
        unit_scale: bool = False, file=None) -> Iterator[tqdm.tqdm]:
  """A tqdm bar, cleared when done; enabled=False (or another process than 0) hides it."""
  # disable=None: tqdm shows the bar only when its file is a terminal. Without
  # jax.distributed this is the only process: asking would start JAX's backend.
  first_process = not jax.distributed.is_initialized() or jax.process_index() == 0
  disable = None if enabled and first_process else True
  with tqdm.tqdm(total=total, desc=description, unit=unit, unit_scale=unit_scale,
                 leave=False, disable=disable, file=file) as progress:
    _open_bars.append(progress)
    try:
      yield progress
    finally:
      _open_bars.remove(progress)


def _advance() -> None:
  if _open_bars:
    _open_bars[-1].update()


def counted(predict_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """predict_fn whose every evaluation, traced into a sampler, advances the open bar by one."""

  def predict(*args, **kwargs) -> jax.Array:
    logits = predict_fn(*args, **kwargs)
    jax.debug.callback(_advance)
    return logits

  return predict
