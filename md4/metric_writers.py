"""Metric output: TensorBoard events, workdir/metrics.jsonl and the log.

clu's metric writers import TensorFlow, which md4 does not depend on, so the
TensorBoard events are written with the `tensorboard` package's record
format. Both files go through `storage.AppendFile`: appended on a disk,
uploaded whole on an object store (which cannot append).

A run resumed at step S keeps the metrics.jsonl lines of steps <= S only, so
that each step is there once, and starts its event file with a SessionLog
START at S, on which TensorBoard drops the older files' events after S.
"""

import json
import math
import os
import socket
import time

from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer

from md4 import storage


def _jsonable(value: float) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)


def lines_up_to(path: epath.Path, step: int) -> bytes:
  """The lines of a metrics.jsonl of steps <= step."""
  if not path.exists():
    return b""
  kept = [line for line in path.read_text().splitlines(keepends=True)
          if line.strip() and json.loads(line)["step"] <= step]
  return "".join(kept).encode()


class EventFile:
  """One TensorBoard event file, named as TensorBoard's own writer names them."""

  def __init__(self, folder: epath.Path, start_step: int):
    folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._records = record_writer.RecordWriter(storage.AppendFile(folder / name, b""))
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if start_step > 0:
      self.add_event(event_pb2.Event(wall_time=time.time(), step=start_step,
                                     session_log=event_pb2.SessionLog(
                                         status=event_pb2.SessionLog.START)))

  def add_event(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  """Writes scalars to TensorBoard, one JSON object per call to metrics.jsonl, and logs.

  Only the main process writes files; every process logs. start_step is the
  step the run starts from (see the module docstring).
  """

  def __init__(self, workdir: epath.Path, is_main_process: bool = True, start_step: int = 0):
    self.is_main_process = is_main_process
    self.jsonl_path = workdir / "metrics.jsonl"
    self._events = None
    self._jsonl = None
    if is_main_process:
      self._jsonl = storage.AppendFile(self.jsonl_path, lines_up_to(self.jsonl_path, start_step))
      self._events = EventFile(workdir / "tensorboard", start_step)

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
    self._jsonl.write((json.dumps(record) + "\n").encode())

  def flush(self) -> None:
    """Makes every line and event written so far visible (an object store gets them now)."""
    if self.is_main_process:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    if self.is_main_process:
      self._jsonl.close()
      self._events.close()
