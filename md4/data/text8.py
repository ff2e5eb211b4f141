"""text8: 100M characters of cleaned English Wikipedia (Mahoney, 2006).

Ids follow `md4.data.alphabet`: 0..25 are 'a'..'z' and 26 is the space.
The file of N characters splits into the first 90/100 (train), the next
5/100 (validation) and the last 5/100 (test): 90M / 5M / 5M for the real
file. Examples are non-overlapping chunks of seq_len characters.

`text8.zip` is looked for in `<config.data_dir>/text8` (~/.cache/md4/text8 by
default) and, when absent, downloaded to a `.part` file whose size and
SHA-256 are checked before it is renamed, so an interrupted download never
leaves a file that looks complete. Options, under `config.text8`: see OPTIONS.
"""

import hashlib
import http.client
import logging
import os
import pathlib
import queue
import tempfile
import threading
import urllib.request
import zipfile
import zlib

import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import alphabet
from md4.data import chars
from md4.data import pipeline
from md4.runtime import progress as progress_lib

URL = "http://mattmahoney.net/dc/text8.zip"
FILENAME = "text8.zip"
MEMBER = "text8"
ZIP_SIZE = 31_344_016
ZIP_SHA256 = "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"
SPLITS = ("train", "validation", "test")
# Split boundaries in hundredths of the file: [0, 90), [90, 95), [95, 100).
_SPLIT_PERCENT = (0, 90, 95, 100)

OPTIONS = {
    "eval_split": "validation",  # The split eval_batches() reads: validation or test.
    "download": True,            # False: never touch the network, fail if the file is absent.
    "url": URL,
    "timeout": 10.0,             # Seconds to connect, and at most between two reads.
}


def _open_url(url: str, timeout: float):
  """urlopen with a deadline that also covers name resolution, which ignores `timeout`."""
  results = queue.Queue(maxsize=1)

  def connect():
    try:
      results.put(urllib.request.urlopen(url, timeout=timeout))
    except Exception as error:  # pylint: disable=broad-exception-caught
      results.put(error)

  threading.Thread(target=connect, daemon=True).start()
  try:
    response = results.get(timeout=timeout)
  except queue.Empty:
    raise TimeoutError(f"no answer from {url} within {timeout} s") from None
  if isinstance(response, Exception):
    raise response
  return response


def download(url: str, path: str | os.PathLike, *, size: int | None = ZIP_SIZE,
             sha256: str | None = ZIP_SHA256, timeout: float = 10.0) -> pathlib.Path:
  """Downloads url to path through a .part file, checking size and SHA-256 before renaming."""
  if timeout <= 0:
    raise ValueError(f"timeout must be > 0, got {timeout}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256()
  received = 0
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".",
                                   suffix=".part", delete=False) as part:
    part_path = pathlib.Path(part.name)
    try:
      with (_open_url(url, timeout) as response,
            progress_lib.bar(size, f"downloading {path.name}", "B", unit_scale=True) as bar):
        while chunk := response.read(1 << 20):
          part.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
      if size is not None and received != size:
        raise ValueError(f"{url} gave {received} bytes, expected {size}")
      if sha256 is not None and digest.hexdigest() != sha256:
        raise ValueError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}")
    except BaseException:
      part_path.unlink(missing_ok=True)
      raise
  os.replace(part_path, path)
  return path


def find_or_download(data_dir: str | os.PathLike, *, url: str = URL, allow_download: bool = True,
                     timeout: float = 10.0, size: int | None = ZIP_SIZE,
                     sha256: str | None = ZIP_SHA256) -> pathlib.Path:
  """The path of text8.zip in data_dir, downloading it there first if it is absent."""
  path = pathlib.Path(data_dir).expanduser() / FILENAME
  if path.exists():
    return path
  where = (f"Put text8.zip ({ZIP_SIZE} bytes, from {URL}) at {path}, or point "
           "config.data_dir at the folder whose text8/ subfolder holds it")
  if not allow_download:
    raise FileNotFoundError(f"{path} does not exist and text8.download is False. {where}.")
  logging.info("Downloading %s to %s", url, path)
  try:
    return download(url, path, size=size, sha256=sha256, timeout=timeout)
  except (OSError, ValueError, http.client.HTTPException) as error:
    raise FileNotFoundError(f"{path} does not exist and downloading {url} failed "
                            f"({error}). {where}.") from error


def read_ids(path: str | os.PathLike) -> np.ndarray:
  """The characters of text8.zip as ids uint8 [N]; rejects a corrupt or truncated zip."""
  path = pathlib.Path(path)
  fix = f"delete it and download it again from {URL}"
  try:
    with zipfile.ZipFile(path) as archive:
      if MEMBER not in archive.namelist():
        raise ValueError(f"{path} has no member {MEMBER!r} (found {archive.namelist()}): {fix}")
      raw = archive.read(MEMBER)  # Checks the CRC-32 of the member.
  except (zipfile.BadZipFile, zlib.error, EOFError) as error:
    raise ValueError(f"{path} is corrupt or truncated ({error}): {fix}") from error
  try:
    return alphabet.encode_bytes(raw)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from error


def split_bounds(num_chars: int) -> dict[str, tuple[int, int]]:
  """Character ranges [start, stop) of the train / validation / test splits."""
  edges = [num_chars * percent // 100 for percent in _SPLIT_PERCENT]
  return {name: (edges[i], edges[i + 1]) for i, name in enumerate(SPLITS)}


def chunk_sources(ids: np.ndarray, length: int) -> dict[str, pipeline.ChunkSource]:
  """Non-overlapping chunks of `length` characters within each split."""
  sources = {}
  for name, (start, stop) in split_bounds(len(ids)).items():
    sources[name] = pipeline.ChunkSource(ids, length, start, (stop - start) // length)
  return sources


def folder(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where text8.zip lives: <config.data_dir>/text8."""
  return pathlib.Path(config.data_dir).expanduser() / "text8"


def _zip_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  options = config.text8
  return find_or_download(folder(config), url=options.url, allow_download=options.download,
                          timeout=options.timeout)


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """text8 in chunks of config.seq_len; eval_batches reads text8.eval_split."""
  options = config.text8
  if options.eval_split not in SPLITS[1:]:
    raise ValueError(f"text8.eval_split must be 'validation' or 'test', got "
                     f"{options.eval_split!r}")
  path = _zip_path(config)
  sources = chunk_sources(read_ids(path), config.seq_len)
  if len(sources["train"]) == 0:
    raise ValueError(f"{path} has too few characters for one training chunk of "
                     f"seq_len={config.seq_len}")
  return data_lib.Dataset(
      train=pipeline.train_iterator(sources["train"], config.batch_size, config.seed),
      eval_batches=pipeline.eval_iterator_fn(sources[options.eval_split], config.batch_size),
      vocab_size=alphabet.VOCAB_SIZE,
      example_shape=(config.seq_len,),
      decode=alphabet.decode,
      encode=alphabet.encode_prompt,
      read_text=chars.read_ids,
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, object]:
  """Downloads text8.zip once (checked size and SHA-256); reports the splits."""
  del progress
  path = _zip_path(config)
  ids = read_ids(path)
  return {"path": str(path), "characters": len(ids), "splits": split_bounds(len(ids))}


def shapes(config: ml_collections.ConfigDict) -> data_lib.Shapes:
  return data_lib.Shapes(alphabet.VOCAB_SIZE, (config.seq_len,))


SOURCE = data_lib.register(data_lib.Source("text8", OPTIONS, create, prepare, shapes))
