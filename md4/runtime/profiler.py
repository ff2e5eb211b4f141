"""A jax.profiler trace of the training steps config.profile_steps names.

The trace goes to WORKDIR/profile/plugins/profile/<time>/: TensorBoard's
profile tab reads it (`pip install tensorboard-plugin-profile`, then
`tensorboard --logdir=WORKDIR/profile`), and its perfetto_trace.json.gz
opens in Perfetto (ui.perfetto.dev).
"""

from typing import Any, Callable

from absl import logging
from etils import epath
import jax

DIRECTORY = "profile"


class StepProfiler:
  """Traces the steps first..last (1-based, as logged) that this run trains.

  A run resumed inside the range traces the rest of it; () traces nothing.
  """

  def __init__(self, profile_steps: tuple[int, ...], workdir: epath.Path):
    self._steps = tuple(profile_steps)
    self._directory = workdir / DIRECTORY
    self._tracing = False

  def run(self, step: int, train_step: Callable[..., Any], *args: Any) -> Any:
    """train_step(*args) as training step `step`, annotated for the profile's step times."""
    if not self._tracing and self._steps and self._steps[0] <= step <= self._steps[1]:
      logging.info("Tracing steps %d to %d into %s", step, self._steps[1], self._directory)
      jax.block_until_ready(args)  # The steps dispatched before stay out of the first one's time.
      jax.profiler.start_trace(str(self._directory), create_perfetto_trace=True)
      self._tracing = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      outputs = train_step(*args)
      if self._tracing:  # Waited for inside the annotation: a traced step's time is its compute.
        jax.block_until_ready(outputs)
    if self._tracing and step >= self._steps[1]:
      self.close()
      logging.info("Wrote the trace up to step %d to %s", step, self._directory)
    return outputs

  def close(self) -> None:
    """Stops a trace still running (the run ended or was preempted inside the range)."""
    if self._tracing:
      self._tracing = False
      jax.profiler.stop_trace()
