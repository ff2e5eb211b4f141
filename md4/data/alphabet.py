"""The text8 alphabet: ids 0..25 are 'a'..'z', id 26 is the space."""

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
VOCAB_SIZE = len(ALPHABET)

_CHAR_TO_ID = np.full(256, -1, dtype=np.int16)
_ID_TO_BYTE = np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)
_CHAR_TO_ID[_ID_TO_BYTE] = np.arange(VOCAB_SIZE)


def encode_bytes(raw: bytes) -> np.ndarray:
  """Maps ASCII bytes already in the alphabet to ids uint8 [N]; raises on other bytes."""
  ids = _CHAR_TO_ID[np.frombuffer(raw, dtype=np.uint8)]
  if (ids < 0).any():
    position = int(np.argmax(ids < 0))
    byte = raw[position]
    shown = repr(chr(byte)) if byte < 128 else f"byte 0x{byte:02x} (of a non-ASCII character)"
    raise ValueError(f"character {shown} at byte offset {position} is not in the text8 "
                     f"alphabet {ALPHABET!r}")
  return ids.astype(np.uint8)


class OutsideAlphabetError(ValueError):
  """A character of a text that is not in the alphabet, at `offset` in the text."""

  def __init__(self, character: str, offset: int):
    super().__init__(f"character {character!r} at offset {offset} is not in the text8 "
                     f"alphabet {ALPHABET!r}")
    self.character = character
    self.offset = offset

  def moved(self, by: int) -> "OutsideAlphabetError":
    """The same error in a text where this one's text starts at offset `by`."""
    return OutsideAlphabetError(self.character, self.offset + by)


def encode(text: str) -> np.ndarray:
  """Maps text already in the alphabet to ids uint8 [N]; raises OutsideAlphabetError naming the
  first other character and its offset in text."""
  try:
    return encode_bytes(text.encode("utf-8"))
  except ValueError:
    position = next(i for i, char in enumerate(text) if char not in ALPHABET)
    raise OutsideAlphabetError(text[position], position) from None


def decode(ids: np.ndarray) -> str:
  """Maps ids [...] in 0..26 back to text (flattened)."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got values in "
                     f"[{ids.min()}, {ids.max()}]")
  return _ID_TO_BYTE[ids].tobytes().decode("ascii")


def encode_prompt(text: str) -> np.ndarray:
  """Prompt text already in the alphabet -> ids int32 [n]; other characters are an error."""
  return encode(text).astype(np.int32)
