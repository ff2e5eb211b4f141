"""Metric output: workdir/metrics.jsonl and the log, always; TensorBoard events and W&B, as
config.writers names them (`WRITERS`).

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

W&B (`pip install 'md4[wandb]'`, `--config.writers=tensorboard,wandb`) logs
the metrics.jsonl names as they are, the samples as a table and the curves
as an image, into the project and mode of config.wandb; a resumed run goes
on in the same W&B run, whose id is kept in WORKDIR/wandb/run_id.

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
import uuid
from typing import Protocol

from absl import logging
from etils import epath
import ml_collections
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


TRAIN_RUN, EVAL_RUN, SOURCE_RUN = "train", "eval", "source"
BITS_PER_TOKEN_TAG = "nelbo/bits_per_token"
CURVES_TAG = "curves"
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


class Writer(Protocol):
  """Where scalars, texts (lists of lines) and PNG images go, besides metrics.jsonl."""

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

  def write_texts(self, step: int, texts: dict[str, list[str]]) -> None: ...

  def write_images(self, step: int, images: dict[str, bytes]) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


class TensorBoardWriter:
  """The train, eval and source runs of the module docstring, each opened at its first event."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict, start_step: int):
    del config  # Nothing to choose.
    self._folder = workdir / "tensorboard"
    self._start_step = start_step
    self._events: dict[str, EventFile] = {}

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    by_run = {}
    for name, value in scalars.items():
      run, tag = tensorboard_name(name)
      by_run.setdefault(run, []).append(summary_pb2.Summary.Value(tag=tag,
                                                                  simple_value=float(value)))
    for run, values in by_run.items():
      self._write(run, step, values)

  def write_texts(self, step: int, texts: dict[str, list[str]]) -> None:
    """One table per tag in the text tab, in the eval run."""
    values = []
    for tag, lines in texts.items():
      tensor = tensor_pb2.TensorProto(
          dtype=types_pb2.DT_STRING, string_val=[line.encode("utf-8") for line in lines],
          tensor_shape=tensor_shape_pb2.TensorShapeProto(
              dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(lines))]))
      values.append(summary_pb2.Summary.Value(
          tag=tag, tensor=tensor, metadata=text_metadata.create_summary_metadata(tag, "")))
    self._write(EVAL_RUN, step, values)

  def write_images(self, step: int, images: dict[str, bytes]) -> None:
    """The images tab; the curves in the train run, samples in the eval run."""
    for tag, png in images.items():
      width, height = Image.open(io.BytesIO(png)).size
      value = summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=height, width=width, colorspace=3, encoded_image_string=png))
      self._write(TRAIN_RUN if tag == CURVES_TAG else EVAL_RUN, step, [value])

  def _write(self, run: str, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if run not in self._events:
      self._events[run] = EventFile(self._folder / run, self._start_step)
    self._events[run].add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    for events in self._events.values():
      events.flush()

  def close(self) -> None:
    for events in self._events.values():
      events.close()


class WandbWriter:
  """A W&B run: scalars under their metrics.jsonl names, texts as tables, images."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict, start_step: int):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ValueError("config.writers names wandb, which is not installed: "
                       "pip install 'md4[wandb]'") from error
    self._wandb = wandb
    folder = workdir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    if not id_file.exists():
      id_file.write_text(uuid.uuid4().hex[:12])
    self._run = wandb.init(
        project=config.wandb.project, entity=config.wandb.entity or None,
        name=config.wandb.name or workdir.name, mode=config.wandb.mode, dir=str(workdir),
        id=id_file.read_text().strip(), resume="allow", config=config.to_dict())
    del start_step  # W&B keeps the steps it has; a resumed run logs from where it stopped.

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    self._run.log({name: float(value) for name, value in scalars.items()}, step=step)

  def write_texts(self, step: int, texts: dict[str, list[str]]) -> None:
    self._run.log({tag: self._wandb.Table(columns=["sample"], data=[[line] for line in lines])
                   for tag, lines in texts.items()}, step=step)

  def write_images(self, step: int, images: dict[str, bytes]) -> None:
    self._run.log({tag: self._wandb.Image(Image.open(io.BytesIO(png)))
                   for tag, png in images.items()}, step=step)

  def flush(self) -> None:
    """W&B sends in the background; nothing to force."""

  def close(self) -> None:
    self._run.finish()


WRITERS = {"tensorboard": TensorBoardWriter, "wandb": WandbWriter}
WANDB_MODES = ("online", "offline", "disabled")


def writer_names(config: ml_collections.ConfigDict) -> list[str]:
  """The writers config.writers names (comma-separated); ValueError for an unknown one."""
  names = [name.strip() for name in config.writers.split(",") if name.strip()]
  for name in names:
    if name not in WRITERS:
      raise ValueError(f"config.writers: unknown writer {name!r}; valid: {sorted(WRITERS)} "
                       "(comma-separated; metrics.jsonl is always written)")
  if "wandb" in names and config.wandb.mode not in WANDB_MODES:
    raise ValueError(f"config.wandb.mode={config.wandb.mode!r}; valid: {WANDB_MODES}")
  return names


class MetricWriter:
  """Writes scalars to metrics.jsonl (one JSON object per call) and the log, and scalars,
  samples (text and images) and the curves PNG to the writers config.writers names.

  Only the main process writes; every process logs. start_step is the step the
  run starts from (see the module docstring).
  """

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict,
               is_main_process: bool = True, start_step: int = 0):
    self.is_main_process = is_main_process
    self.jsonl_path = workdir / "metrics.jsonl"
    self._jsonl = None
    self._writers: list[Writer] = []
    if is_main_process:
      self._jsonl = storage.AppendFile(self.jsonl_path, lines_up_to(self.jsonl_path, start_step))
      self._writers = [WRITERS[name](workdir, config, start_step)
                       for name in writer_names(config)]

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    logging.info("step %d: %s", step,
                 ", ".join(f"{name}={float(value):.5g}" for name, value in scalars.items()))
    if not self.is_main_process:
      return
    record = {"step": step, **{name: _jsonable(value) for name, value in scalars.items()}}
    self._jsonl.write((json.dumps(record) + "\n").encode())
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    """Makes every line and event written so far visible (an object store gets them now)."""
    if self.is_main_process:
      self._jsonl.flush()
      for writer in self._writers:
        writer.flush()

  def write_curves(self, step: int, title: str) -> epath.Path:
    """Plots metrics.jsonl to curves.png beside it (`md4.plots`) and sends it to the writers."""
    self.flush()  # An object store's metrics.jsonl is complete only once uploaded.
    path = plots.write_curves(self.jsonl_path.parent, title)
    logging.info("training curves: %s", path)
    for writer in self._writers:
      writer.write_images(step, {CURVES_TAG: path.read_bytes()})
    return path

  def write_sample_files(self, step: int, paths: list[str]) -> None:
    """Sends sample files (`md4.samples.write`) to the writers: .txt as text, .png as images.

    Text samples are also logged, one per line.
    """
    for path in map(epath.Path, paths):
      if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        logging.info("samples at step %d:\n%s", step, "\n".join(lines))
        for writer in self._writers:
          writer.write_texts(step, {"samples/text": lines})
      elif path.suffix == ".png":
        name = path.stem.removeprefix(f"step_{step}").lstrip("_") or "grid"
        for writer in self._writers:
          writer.write_images(step, {f"samples/{name}": path.read_bytes()})

  def close(self) -> None:
    if self.is_main_process:
      self._jsonl.close()
      for writer in self._writers:
        writer.close()
