"""Pixel-token images to PNG: sample grids and reverse-process montages."""

import io
import math

from etils import epath
import numpy as np
from PIL import Image

MASK_COLOR = (128, 128, 128)  # Masked pixel channels are drawn mid-grey.


def to_pixels(tokens: np.ndarray, mask_id: int = 256) -> np.ndarray:
  """Pixel tokens [..., H, W, 3] (mask id allowed) -> uint8 [..., H, W, 3]."""
  tokens = np.asarray(tokens)
  grey = np.broadcast_to(np.asarray(MASK_COLOR, np.int64), tokens.shape)
  return np.where(tokens == mask_id, grey, tokens).astype(np.uint8)


def grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """Tiles images uint8 [N, H, W, 3] into one [rows (H + p) + p, columns (W + p) + p, 3]."""
  num, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(num))
  rows = math.ceil(num / columns)
  canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding,
                    channels), 255, np.uint8)
  for index, image in enumerate(images):
    top = padding + (index // columns) * (height + padding)
    left = padding + (index % columns) * (width + padding)
    canvas[top:top + height, left:left + width] = image
  return canvas


def save_png(path: epath.Path, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] losslessly as PNG (works on any etils path, e.g. gs://)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  epath.Path(path).write_bytes(buffer.getvalue())
