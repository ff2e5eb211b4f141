"""Metric output: TensorBoard events, workdir/metrics.jsonl and the log.

clu's metric writers import TensorFlow, which md4 does not depend on, so the
TensorBoard events are written with the `tensorboard` package's record
format, and text and image summaries are built as the protos its plugins
read. Both files go through `storage.AppendFile`: appended on a disk,
uploaded whole on an object store (which cannot append).

TensorBoard sees three runs, as clu and MaxText lay them out:
`tensorboard/train`, `tensorboard/eval` and, on a source of known entropy,
`tensorboard/source`. Training and held-out bits per token, and the source's
entropy, share the tag `nelbo/bits_per_token`, so one chart overlays them;
the other scalars are grouped under `train/`, `eval/`, `samples/` and
`system/` (`tensorboard_name`). metrics.jsonl keeps md4's flat names.

A run resumed at step S keeps the metrics.jsonl lines of steps <= S only, so
that each step is there once, and starts its event files with a SessionLog
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
from md4 import storage


def _jsonable(value: float) -> float | str:
  value = float(value)
  return value if math.isfinite(value) else str(value)


TRAIN_RUN, EVAL_RUN, SOURCE_RUN = "train", "eval", "source"
BITS_PER_TOKEN_TAG = "nelbo/bits_per_token"
# metrics.jsonl names whose TensorBoard run and tag the prefixes below do not give.
_TENSORBOARD_NAMES = {
    "bits_per_token": (TRAIN_RUN, BITS_PER_TOKEN_TAG),
    "eval_bits_per_token": (EVAL_RUN, BITS_PER_TOKEN_TAG),
    "data_entropy_bits_per_token": (SOURCE_RUN, BITS_PER_TOKEN_TAG),
    "steps_per_sec": (TRAIN_RUN, "system/steps_per_sec"),
    "eval_seconds": (EVAL_RUN, "system/eval_seconds"),
}


def tensorboard_name(name: str) -> tuple[str, str]:
  """(run, tag) of a metrics.jsonl scalar: eval_X is eval/X in the eval run, samples/X stays in
  the eval run, any other is train/X in the train run."""
  if name in _TENSORBOARD_NAMES:
    return _TENSORBOARD_NAMES[name]
  if name.startswith("samples/"):
    return EVAL_RUN, name
  if name.startswith("eval_"):
    return EVAL_RUN, "eval/" + name.removeprefix("eval_")
  return TRAIN_RUN, "train/" + name


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
    self._tensorboard_dir = workdir / "tensorboard"
    self._start_step = start_step
    self._events: dict[str, EventFile] = {}  # By run, each opened at its first event.
    self._jsonl = None
    if is_main_process:
      self._jsonl = storage.AppendFile(self.jsonl_path, lines_up_to(self.jsonl_path, start_step))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    logging.info("step %d: %s", step,
                 ", ".join(f"{name}={float(value):.5g}" for name, value in scalars.items()))
    if not self.is_main_process:
      return
    by_run = {}
    for name, value in scalars.items():
      run, tag = tensorboard_name(name)
      by_run.setdefault(run, []).append(summary_pb2.Summary.Value(tag=tag,
                                                                  simple_value=float(value)))
    for run, values in by_run.items():
      self._write(run, step, values)
    record = {"step": step, **{name: _jsonable(value) for name, value in scalars.items()}}
    self._jsonl.write((json.dumps(record) + "\n").encode())

  def flush(self) -> None:
    """Makes every line and event written so far visible (an object store gets them now)."""
    if self.is_main_process:
      self._jsonl.flush()
      for events in self._events.values():
        events.flush()

  def write_texts(self, step: int, texts: dict[str, list[str]], run: str = EVAL_RUN) -> None:
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
    self._write(run, step, values)

  def write_images(self, step: int, images: dict[str, bytes], run: str = EVAL_RUN) -> None:
    """PNG files' bytes, shown by TensorBoard's images tab."""
    if not self.is_main_process:
      return
    values = []
    for tag, png in images.items():
      width, height = Image.open(io.BytesIO(png)).size
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=height, width=width, colorspace=3, encoded_image_string=png)))
    self._write(run, step, values)

  def write_curves(self, step: int, title: str) -> epath.Path:
    """Plots metrics.jsonl to curves.png beside it (`md4.plots`) and sends it to TensorBoard."""
    self.flush()  # An object store's metrics.jsonl is complete only once uploaded.
    path = plots.write_curves(self.jsonl_path.parent, title)
    logging.info("training curves: %s", path)
    self.write_images(step, {"curves": path.read_bytes()}, run=TRAIN_RUN)
    return path

  def write_sample_files(self, step: int, paths: list[str]) -> None:
    """Sends sample files (`md4.samples.write`) to TensorBoard: .txt as text, .png as images.

    Text samples are also logged, one per line.
    """
    for path in map(epath.Path, paths):
      if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        logging.info("samples at step %d:\n%s", step, "\n".join(lines))
        self.write_texts(step, {"samples/text": lines})
      elif path.suffix == ".png":
        name = path.stem.removeprefix(f"step_{step}").lstrip("_") or "grid"
        self.write_images(step, {f"samples/{name}": path.read_bytes()})

  def _write(self, run: str, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if run not in self._events:
      self._events[run] = EventFile(self._tensorboard_dir / run, self._start_step)
    self._events[run].add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary_pb2.Summary(value=values)))

  def close(self) -> None:
    if self.is_main_process:
      self._jsonl.close()
      for events in self._events.values():
        events.close()
