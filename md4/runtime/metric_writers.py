"""Metric output: TensorBoard events, workdir/metrics.jsonl and the log.

clu's metric writers import TensorFlow, which md4 does not depend on, so the
TensorBoard events are written with the `tensorboard` package's record
format, and text and image summaries are built as the protos its plugins
read. Both files go through `storage.AppendFile`: appended on a disk,
uploaded whole on an object store (which cannot append).

A run resumed at step S keeps the metrics.jsonl lines of steps <= S only, so
that each step is there once, and starts its event file with a SessionLog
START at S, on which TensorBoard drops the older files' events after S.
"""

import io
import json
import math
import os
import socket
import time

from absl import logging
from etils import epath
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer import record_writer

from md4 import plots
from md4.runtime import storage


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
  """Writes scalars to TensorBoard, one JSON object per call to metrics.jsonl, and logs;
  samples (text and images) and the curves PNG to TensorBoard.

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
    self._write(step, [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
                       for name, value in scalars.items()])
    record = {"step": step, **{name: _jsonable(value) for name, value in scalars.items()}}
    self._jsonl.write((json.dumps(record) + "\n").encode())

  def flush(self) -> None:
    """Makes every line and event written so far visible (an object store gets them now)."""
    if self.is_main_process:
      self._jsonl.flush()
      self._events.flush()

  def write_texts(self, step: int, texts: dict[str, list[str]]) -> None:
    """Lists of strings, shown by TensorBoard's text tab as one table per tag."""
    if not self.is_main_process:
      return
    values = []
    for tag, lines in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING, string_val=[line.encode("utf-8") for line in lines],
          tensor_shape=tensor_shape_pb2.TensorShapeProto(
              dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(lines))]))
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor, metadata=text_metadata.create_summary_metadata(tag, "")))
    self._write(step, values)

  def write_images(self, step: int, images: dict[str, bytes]) -> None:
    """PNG files' bytes, shown by TensorBoard's images tab."""
    if not self.is_main_process:
      return
    values = []
    for tag, png in images.items():
      width, height = Image.open(io.BytesIO(png)).size
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=height, width=width, colorspace=3, encoded_image_string=png)))
    self._write(step, values)

  def write_curves(self, step: int, title: str) -> epath.Path:
    """Plots metrics.jsonl to curves.png beside it (`md4.plots`) and sends it to TensorBoard."""
    self.flush()  # An object store's metrics.jsonl is complete only once uploaded.
    path = plots.write_curves(self.jsonl_path.parent, title)
    logging.info("training curves: %s", path)
    self.write_images(step, {"curves": path.read_bytes()})
    return path

  def write_sample_files(self, step: int, paths: list[str]) -> None:
    """Sends sample files (`md4.samples.write`) to TensorBoard: .txt as text, .png as images.

    Text samples are also logged, one per line.
    """
    for path in map(epath.Path, paths):
      if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        logging.info("samples at step %d:\n%s", step, "\n".join(lines))
        self.write_texts(step, {"samples": lines})
      elif path.suffix == ".png":
        name = path.stem.removeprefix(f"step_{step}").lstrip("_") or "grid"
        self.write_images(step, {f"samples/{name}": path.read_bytes()})

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                           summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    if self.is_main_process:
      self._jsonl.close()
      self._events.close()
