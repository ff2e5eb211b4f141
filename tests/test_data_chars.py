"""Local character files mapped to the text8 alphabet."""

import pathlib
import re

import ml_collections
import numpy as np
import pytest

from md4 import data as data_lib
from md4.data import alphabet
from md4.data import chars
from md4.data import pipeline
from tests import helpers

_SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def _config(path, seq_len=10, batch_size=5, **options) -> ml_collections.ConfigDict:
  return helpers.data_config("chars", seq_len=seq_len, batch_size=batch_size, path=path,
                             **options)


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  leading and trailing  ", "leading and trailing"),
    ("tabs\tand\nnew\r\nlines", "tabs and new lines"),
    ("runs   of,;  spaces", "runs of spaces"),
    ("in 1984 we", "in one nine eight four we"),
    ("a0b", "a zero b"),
    ("Café naïve ÉCOLE", "cafe naive ecole"),
    ("Straße", "strasse"),
    ("ﬁne", "fine"),
    ("x²", "x two"),
    ("don't", "don t"),
    ("Ωmega Ψ", "mega"),
    ("!!!", ""),
])
def test_normalisation(text, expected):
  assert chars.normalise(text) == expected


def test_strict_mode_accepts_alphabet_and_line_breaks(tmp_path):
  path = tmp_path / "ok.txt"
  path.write_bytes(b"abc def\r\nghi\n")
  np.testing.assert_array_equal(chars.read_ids(str(path), strict=True),
                                alphabet.encode("abc def ghi"))


@pytest.mark.parametrize("content, line, column, char", [
    ("abc\nde F\n", 2, 4, "F"),
    ("abc,\n", 1, 4, ","),
    ("ok\nok\n\tx", 3, 1, "\t"),
    ("line one\nlé", 2, 2, "é"),
])
def test_strict_mode_error_names_file_line_and_column(tmp_path, content, line, column, char):
  path = tmp_path / "bad.txt"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"bad.txt:{line}:{column}: character {char!r}")):
    data_lib.create(_config(str(path), strict=True))


def test_split_sizes_at_a_chunk_boundary(tmp_path):
  text = alphabet.decode(np.random.default_rng(0).integers(0, 26, 1005))  # No spaces.
  (tmp_path / "a.txt").write_text(text)
  # 1005 characters -> 100 chunks of 10; a quarter held out from the end.
  assert pipeline.split_chunks(1005, 10, 0.25) == (75, 25)
  dataset = data_lib.create(_config(str(tmp_path / "a.txt"), validation_fraction=0.25))
  ids = alphabet.encode(text)
  eval_rows = np.concatenate([batch["x"] for batch in dataset.eval_batches()])
  np.testing.assert_array_equal(eval_rows, ids[750:1000].reshape(25, 10))
  train_rows = np.concatenate([next(dataset.train)["x"] for _ in range(15)])
  assert sorted(map(bytes, train_rows.astype(np.uint8))) == sorted(
      map(bytes, ids[:750].reshape(75, 10)))


def test_files_and_globs_are_joined_in_order_with_one_space(tmp_path):
  for name, text in [("b.txt", "Second"), ("a.txt", "First!"), ("c.md", "third")]:
    (tmp_path / name).write_text(text)
  ids = chars.read_ids([str(tmp_path / "*.txt"), str(tmp_path / "c.md")])
  assert alphabet.decode(ids) == "first second third"


def test_bad_paths_and_options_are_rejected(tmp_path):
  (tmp_path / "a.txt").write_text("abc " * 100)
  with pytest.raises(ValueError, match="path must name"):
    chars.read_ids("")
  with pytest.raises(ValueError, match="no file matches"):
    chars.read_ids(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="no file matches"):
    chars.read_ids(str(tmp_path / "*.none"))
  with pytest.raises(ValueError, match=r"chars.validation_fraction must be in \(0, 1\)"):
    data_lib.create(_config(str(tmp_path / "a.txt"), validation_fraction=1.0))
  with pytest.raises(ValueError, match="and 0 for validation"):
    data_lib.create(_config(str(tmp_path / "a.txt"), validation_fraction=0.01))
  with pytest.raises(ValueError, match="unknown config key 'chars.order'"):
    _config(str(tmp_path / "a.txt"), order=2)
  (tmp_path / "latin1.txt").write_bytes(b"abc\xe9")
  with pytest.raises(ValueError, match="latin1.txt: not UTF-8 at byte 3"):
    chars.read_ids(str(tmp_path / "latin1.txt"))
  (tmp_path / "empty.txt").write_text("!?")
  with pytest.raises(ValueError, match="holds no characters"):
    chars.read_ids(str(tmp_path / "empty.txt"))


def test_bundled_tinyshakespeare_is_the_default_and_maps_to_the_alphabet():
  if _SHAKESPEARE.exists():
    assert chars.BUNDLED_TEXT.read_bytes() == _SHAKESPEARE.read_bytes()
  ids = chars.read_ids(str(chars.BUNDLED_TEXT))
  text = alphabet.decode(ids)
  assert len(ids) == 1_059_742
  assert text.startswith("first citizen before we proceed any further hear me speak")
  assert "  " not in text and text == text.strip()
  dataset = data_lib.create(_config("", seq_len=256, batch_size=8))
  np.testing.assert_array_equal(next(dataset.eval_batches())["x"][0],
                                ids[(len(ids) // 256 - 414) * 256:][:256])
  batch = next(dataset.train)["x"]
  assert batch.shape == (8, 256) and batch.dtype == np.int32
  assert 0 <= batch.min() and batch.max() < 27
