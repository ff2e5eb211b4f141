"""Metric output: TensorBoard events, workdir/metrics.jsonl and the log.

clu's metric writers import TensorFlow, which md4 does not depend on, so the
TensorBoard events are written with the `tensorboard` package's own writer.
"""

import json
import math
import time

from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer


def _jsonable(value: float) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricWriter:
  """Writes scalars to TensorBoard, one JSON object per call to metrics.jsonl, and logs.

  Only the main process writes files; every process logs.
  """

  def __init__(self, workdir: epath.Path, is_main_process: bool = True):
    self.is_main_process = is_main_process
    self.jsonl_path = workdir / "metrics.jsonl"
    self._events = None
    if is_main_process:
      (workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
      self._events = event_file_writer.EventFileWriter(str(workdir / "tensorboard"))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    logging.info("step %d: %s", step,
                 ", ".join(f"{name}={float(value):.5g}" for name, value in scalars.items()))
    if not self.is_main_process:
      return
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()
    ])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    record = {"step": step, **{name: _jsonable(value) for name, value in scalars.items()}}
    with self.jsonl_path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
