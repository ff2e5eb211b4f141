"""Character-level text from local UTF-8 files, in the text8 alphabet.

`config.chars.path` names the files: a path or a glob pattern; empty means the
bundled Tiny Shakespeare (md4/data/assets/tinyshakespeare.txt, 1.1 MB).

Normalisation (the default), applied to each file:
  1. Unicode case folding, then NFKD with combining marks dropped
     ("Café" -> "cafe", "ß" -> "ss", "ﬁ" -> "fi");
  2. each digit 0-9 spelt as a word between spaces, as text8 does
     ("42" -> " four two ");
  3. every character other than a-z becomes a space;
  4. runs of spaces collapse to one; leading and trailing spaces go.
Files are joined with one space.

With chars.strict=True the text is taken as it is: it may hold only a-z,
spaces and line breaks (each line break, "\\n" or "\\r\\n", reads as a space;
one at the end of a file is dropped), and any other character is an error
naming its file, line and column (1-based).

Examples are non-overlapping chunks of seq_len characters; the last
chars.validation_fraction of them (rounded to whole chunks) is held out.
"""

import glob
import os
import pathlib
import re
import unicodedata
from typing import Sequence

import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import alphabet
from md4.data import pipeline

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")

BUNDLED_TEXT = pathlib.Path(__file__).parent / "assets" / "tinyshakespeare.txt"

OPTIONS = {
    "path": "",                   # A file or a glob pattern; empty: the bundled Tiny Shakespeare.
    "strict": False,              # Reject characters outside the alphabet instead of mapping them.
    "validation_fraction": 0.1,   # Share of the chunks held out, taken from the end.
}

_DIGIT = re.compile("[0-9]")
_NOT_LETTER = re.compile("[^a-z]+")
_STRICT_INVALID = re.compile("[^a-z ]")


def normalise(text: str) -> str:
  """Maps any text to the text8 alphabet (see the module docstring)."""
  text = unicodedata.normalize("NFKD", text.casefold())
  combining = {ord(c): None for c in set(text) if unicodedata.combining(c)}
  text = text.translate(combining)
  text = _DIGIT.sub(lambda match: f" {DIGIT_WORDS[int(match.group())]} ", text)
  return _NOT_LETTER.sub(" ", text).strip(" ")


def check_strict(text: str, filename: str) -> str:
  """`text` with line breaks read as spaces; ValueError at the first character not allowed."""
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  lines = [line[:-1] if line.endswith("\r") else line for line in lines]
  for number, line in enumerate(lines, start=1):
    invalid = _STRICT_INVALID.search(line)
    if invalid is not None:
      raise ValueError(f"{filename}:{number}:{invalid.start() + 1}: character "
                       f"{invalid.group()!r} is not in the text8 alphabet "
                       f"{alphabet.ALPHABET!r} (chars.strict=True)")
  return " ".join(lines)


def resolve_paths(path: str | Sequence[str], option: str = "path") -> list[pathlib.Path]:
  """Files named by a path, a glob pattern, or a list of them, in the order given.

  option names the config key in errors.
  """
  patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if not patterns or any(not str(pattern) for pattern in patterns):
    raise ValueError(f"{option} must name one or more files, got {path!r}")
  files = []
  for pattern in patterns:
    pattern = os.path.expanduser(str(pattern))
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.isfile(match) for match in matches):
      raise ValueError(f"{option}: no file matches {pattern!r}")
    files.extend(pathlib.Path(match) for match in matches)
  return files


def read_text(path: pathlib.Path) -> str:
  """The UTF-8 text of a file; a decoding error names the file and byte offset."""
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise ValueError(f"{path}: not UTF-8 at byte {error.start} ({error.reason})") from error


def read_ids(path: str | Sequence[str], strict: bool = False,
             option: str = "path") -> np.ndarray:
  """All files named by `path`, mapped to the alphabet and joined, as ids uint8 [N]."""
  pieces = []
  for file in resolve_paths(path, option):
    text = read_text(file)
    pieces.append(check_strict(text, str(file)) if strict else normalise(text))
  ids = alphabet.encode(" ".join(pieces))
  if len(ids) == 0:
    raise ValueError(f"{option}={path!r} holds no characters of the text8 alphabet")
  return ids


def _split(config: ml_collections.ConfigDict
           ) -> tuple[pipeline.ChunkSource, pipeline.ChunkSource]:
  """(train, validation) chunks of config.seq_len characters of chars.path (both over all ids)."""
  options = config.chars
  ids = read_ids(options.path or str(BUNDLED_TEXT), strict=options.strict,
                 option="chars.path")
  length = config.seq_len
  if length < 1:
    raise ValueError(f"seq_len must be >= 1, got {length}")
  num_train, num_validation = pipeline.split_chunks(
      len(ids), length, options.validation_fraction, "chars.validation_fraction")
  return (pipeline.ChunkSource(ids, length, 0, num_train),
          pipeline.ChunkSource(ids, length, num_train * length, num_validation))


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Chunks of config.seq_len characters from chars.path; the last fraction is held out."""
  train, validation = _split(config)
  return data_lib.Dataset(
      train=pipeline.train_iterator(train, config.batch_size, config.seed),
      eval_batches=pipeline.eval_iterator_fn(validation, config.batch_size),
      vocab_size=alphabet.VOCAB_SIZE,
      example_shape=(config.seq_len,),
      decode=alphabet.decode,
      encode=alphabet.encode_prompt,
      read_text=read_ids,
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, int]:
  """Reads and normalises chars.path; reports the split sizes."""
  del progress
  train, validation = _split(config)
  return {"characters": len(train.ids), "train_chunks": len(train),
          "validation_chunks": len(validation)}


def shapes(config: ml_collections.ConfigDict) -> data_lib.Shapes:
  return data_lib.Shapes(alphabet.VOCAB_SIZE, (config.seq_len,))


SOURCE = data_lib.register(data_lib.Source("chars", OPTIONS, create, prepare, shapes))
