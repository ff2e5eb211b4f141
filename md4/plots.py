"""The end-of-run picture: training and held-out bits per token against the step, as a PNG.

Drawn with Pillow alone. The plotted series are also stored in the PNG, as the
JSON text chunk "md4_curves" (the points and the data-to-pixel mapping), so
a test or a script can check what the picture shows against metrics.jsonl.
"""

import io
import json
import math
from typing import Any, Iterable

from etils import epath
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import PngImagePlugin

CURVES_FILE = "curves.png"
TEXT_CHUNK = "md4_curves"
SIZE = (900, 540)
MARGINS = (80, 60, 30, 70)  # left, top, right, bottom, in pixels.
COLORS = {"train": (31, 119, 180), "held_out": (214, 39, 40), "entropy": (44, 160, 44)}
LABELS = {"train": "training (batch mean)", "held_out": "held-out NELBO",
          "entropy": "source entropy"}
_AXIS, _GRID, _TEXT = (60, 60, 60), (225, 225, 225), (20, 20, 20)


def curves(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """The series of a metrics.jsonl, by step.

  Returns {"train": [[step, bits]], "held_out": [[step, bits, stderr]],
  "entropy": bits or None}. Non-finite values (written as strings) are left
  out; a step logged twice (a run resumed from an earlier checkpoint) keeps
  its last value.
  """
  train, held_out, entropy = {}, {}, None
  for record in records:
    if _finite(record.get("bits_per_token")):
      train[record["step"]] = [record["step"], record["bits_per_token"]]
    if _finite(record.get("eval_bits_per_token")):
      held_out[record["step"]] = [record["step"], record["eval_bits_per_token"],
                                  record.get("eval_bits_per_token_stderr", 0.0)]
    if _finite(record.get("data_entropy_bits_per_token")):
      entropy = record["data_entropy_bits_per_token"]
  return {"train": [train[step] for step in sorted(train)],
          "held_out": [held_out[step] for step in sorted(held_out)], "entropy": entropy}


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _ticks(low: float, high: float, count: int = 6) -> list[float]:
  """Round tick values covering [low, high]."""
  raw = (high - low) / count
  magnitude = 10**math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
  first = math.ceil(low / step) * step
  return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _limits(series: dict[str, Any]) -> tuple[float, float, float, float]:
  """(x_min, x_max, y_min, y_max) around every point, the error bars and the entropy."""
  points = series["train"] + series["held_out"]
  xs = [p[0] for p in points]
  ys = [p[1] for p in series["train"]]
  ys += [p[1] + s * p[2] for p in series["held_out"] for s in (-1, 1)]
  if series["entropy"] is not None:
    ys.append(series["entropy"])
  x_min, x_max = min(xs), max(xs)
  y_min, y_max = min(ys), max(ys)
  pad = 0.05 * (y_max - y_min) or 0.5
  return (x_min, x_max if x_max > x_min else x_min + 1, y_min - pad, y_max + pad)


def render(series: dict[str, Any], title: str) -> Image.Image:
  """The picture of `curves(...)`; its "md4_curves" info holds the series and the mapping."""
  if not series["train"] and not series["held_out"]:
    raise ValueError("no finite bits_per_token or eval_bits_per_token in the metrics to plot")
  width, height = SIZE
  left, top, right, bottom = MARGINS
  box = [left, top, width - right, height - bottom]
  x_min, x_max, y_min, y_max = _limits(series)

  def pixel(x: float, y: float) -> tuple[int, int]:
    return (round(box[0] + (x - x_min) / (x_max - x_min) * (box[2] - box[0])),
            round(box[3] - (y - y_min) / (y_max - y_min) * (box[3] - box[1])))

  image = Image.new("RGB", SIZE, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for y in _ticks(y_min, y_max):
    _, row = pixel(x_min, y)
    draw.line([box[0], row, box[2], row], fill=_GRID)
    draw.text((box[0] - 8, row), f"{y:g}", fill=_TEXT, font=font, anchor="rm")
  for x in _ticks(x_min, x_max):
    column, _ = pixel(x, y_min)
    draw.line([column, box[1], column, box[3]], fill=_GRID)
    draw.text((column, box[3] + 8), f"{x:g}", fill=_TEXT, font=font, anchor="mt")
  draw.rectangle(box, outline=_AXIS)
  draw.text(((box[0] + box[2]) // 2, height - 20), "step", fill=_TEXT, font=font, anchor="mm")
  draw.text((12, box[1] - 12), "bits per token", fill=_TEXT, font=font, anchor="lm")
  draw.text(((box[0] + box[2]) // 2, 16), title, fill=_TEXT, font=font, anchor="mm")

  if series["entropy"] is not None:
    row = pixel(x_min, series["entropy"])[1]
    for start in range(box[0], box[2], 12):  # Dashed.
      draw.line([start, row, min(start + 6, box[2]), row], fill=COLORS["entropy"], width=2)
  if series["train"]:
    draw.line([pixel(x, y) for x, y in series["train"]], fill=COLORS["train"], width=2)
  for x, y, stderr in series["held_out"]:
    column, row = pixel(x, y)
    low, high = pixel(x, y - stderr)[1], pixel(x, y + stderr)[1]
    draw.line([column, low, column, high], fill=COLORS["held_out"], width=2)
    draw.ellipse([column - 4, row - 4, column + 4, row + 4], fill=COLORS["held_out"])

  # The legend sits above the plot, where it covers no point.
  shown = [name for name in ("train", "held_out", "entropy")
           if series[name] not in (None, [])]
  for index, name in enumerate(shown):
    column, row = box[0] + 120 + 200 * index, box[1] - 30
    draw.line([column, row, column + 25, row], fill=COLORS[name], width=3)
    draw.text((column + 32, row), LABELS[name], fill=_TEXT, font=font, anchor="lm")

  image.info[TEXT_CHUNK] = json.dumps({
      **series, "limits": [x_min, x_max, y_min, y_max], "box": box, "colors": COLORS})
  return image


def encode_png(image: Image.Image) -> bytes:
  """PNG bytes, with image.info's "md4_curves" as a text chunk."""
  info = PngImagePlugin.PngInfo()
  if TEXT_CHUNK in image.info:
    info.add_text(TEXT_CHUNK, image.info[TEXT_CHUNK])
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", pnginfo=info)
  return buffer.getvalue()


def write_curves(workdir: epath.Path, title: str = "") -> epath.Path:
  """Plots workdir/metrics.jsonl to workdir/curves.png; returns its path."""
  workdir = epath.Path(workdir)
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  series = curves(json.loads(line) for line in lines if line.strip())
  path = workdir / CURVES_FILE
  path.write_bytes(encode_png(render(series, title or str(workdir))))
  return path
