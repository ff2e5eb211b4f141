"""The text8 alphabet: ids 0..25 are 'a'..'z', id 26 is the space."""

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
VOCAB_SIZE = len(ALPHABET)
SPACE_ID = ALPHABET.index(" ")

_CHAR_TO_ID = np.full(256, -1, dtype=np.int16)
_CHAR_TO_ID[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(VOCAB_SIZE)


def encode(text: str) -> np.ndarray:
  """Maps text already in the alphabet to ids uint8 [N]; raises on other characters."""
  raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  ids = _CHAR_TO_ID[raw]
  if (ids < 0).any():
    position = int(np.argmax(ids < 0))
    raise ValueError(f"character {text.encode('utf-8')[position:position + 1]!r} at "
                     f"offset {position} is not in the text8 alphabet {ALPHABET!r}")
  return ids.astype(np.uint8)


def decode(ids: np.ndarray) -> str:
  """Maps ids [N] in 0..26 back to text."""
  return "".join(ALPHABET[i] for i in np.asarray(ids).reshape(-1))
