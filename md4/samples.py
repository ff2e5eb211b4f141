"""Sample files, the same for training (workdir/samples/) and md4.evaluate (workdir/eval/).

`<name>.txt`   text: one sample per line (a line break inside a sample is written as \\n);
`<name>.png`   images: a grid of the samples, and `<name>_reverse_process.png`, a strip
               of the first sample's reverse process when frames were recorded;
`<name>.npy`   the token ids [N, *example_shape], always.
"""

import io
import itertools

from etils import epath
import numpy as np

from md4 import data as data_lib
from md4 import visualize
from md4.runtime import storage


def unused_name(folder: epath.Path, name: str) -> str:
  """name, or name_2, name_3, ...: the first that no file of folder starts with (then a dot)."""
  taken = {path.name.split(".")[0] for path in folder.iterdir()} if folder.exists() else set()
  candidates = itertools.chain([name], (f"{name}_{run}" for run in itertools.count(2)))
  return next(candidate for candidate in candidates if candidate not in taken)


def write(folder: epath.Path, name: str, tokens: np.ndarray, dataset: data_lib.Dataset,
          frames: np.ndarray | None = None) -> list[str]:
  """Writes tokens [N, ...] (and frames [F, N, ...]) under folder; returns the files written."""
  folder.mkdir(parents=True, exist_ok=True)
  written = []
  if dataset.modality == "image":
    visualize.save_png(folder / f"{name}.png", visualize.grid(visualize.to_pixels(tokens)))
    written.append(folder / f"{name}.png")
    if frames is not None:
      strip = visualize.grid(visualize.to_pixels(frames[:, 0]), columns=len(frames))
      visualize.save_png(folder / f"{name}_reverse_process.png", strip)
      written.append(folder / f"{name}_reverse_process.png")
  else:
    lines = [dataset.decode(sample).replace("\n", "\\n") for sample in tokens]
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    written.append(folder / f"{name}.txt")
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(tokens))
  # Written last and whole: its presence says the samples are complete (md4.train.finish).
  storage.write_whole(folder / f"{name}.npy", buffer.getvalue())
  written.append(folder / f"{name}.npy")
  return [str(path) for path in written]
