"""text8 from small zips built here; nothing is downloaded from the internet."""

import functools
import hashlib
import http.server
import pathlib
import re
import socket
import threading
import time
import zipfile

import ml_collections
import numpy as np
import pytest

from md4 import data as data_lib
from md4.data import alphabet
from md4.data import text8
from tests import helpers


def _write_zip(path: pathlib.Path, text: bytes, member: str = "text8") -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    archive.writestr(member, text)
  return path


def _random_text(num_chars: int, seed: int = 0) -> bytes:
  ids = np.random.default_rng(seed).integers(0, alphabet.VOCAB_SIZE, num_chars)
  return alphabet.decode(ids).encode("ascii")


def _config(data_dir, seq_len=16, batch_size=25, **options) -> ml_collections.ConfigDict:
  """Reads <data_dir>/text8/text8.zip."""
  return helpers.data_config("text8", data_dir=str(data_dir), seq_len=seq_len,
                             batch_size=batch_size, **{"download": False, **options})


def test_ids_follow_the_alphabet_space_last(tmp_path):
  path = _write_zip(tmp_path / "text8" / "text8.zip", b" abc zyx")
  np.testing.assert_array_equal(text8.read_ids(path), [26, 0, 1, 2, 26, 25, 24, 23])


def test_split_bounds_are_90_5_5_of_the_file():
  assert text8.split_bounds(100_000_000) == {
      "train": (0, 90_000_000), "validation": (90_000_000, 95_000_000),
      "test": (95_000_000, 100_000_000)}
  assert text8.split_bounds(20_050) == {
      "train": (0, 18_045), "validation": (18_045, 19_047), "test": (19_047, 20_050)}


def test_chunks_and_split_boundaries_scale_to_the_file(tmp_path):
  text = _random_text(20_050)
  _write_zip(tmp_path / "text8" / "text8.zip", text)
  ids = alphabet.encode(text.decode())
  sources = text8.chunk_sources(text8.read_ids(tmp_path / "text8" / "text8.zip"), 16)
  # 18045 // 16, 1002 // 16, 1003 // 16 non-overlapping chunks.
  assert {name: len(source) for name, source in sources.items()} == {
      "train": 1127, "validation": 62, "test": 62}
  np.testing.assert_array_equal(sources["train"][1126]["x"], ids[1126 * 16:1127 * 16])
  np.testing.assert_array_equal(sources["validation"][0]["x"], ids[18_045:18_061])
  np.testing.assert_array_equal(sources["test"][61]["x"], ids[19_047 + 61 * 16:19_047 + 62 * 16])
  assert sources["train"][0]["x"].dtype == np.int32


def test_create_covers_each_training_chunk_once_per_epoch(tmp_path):
  text = _random_text(20_000)
  _write_zip(tmp_path / "text8" / "text8.zip", text)
  dataset = data_lib.create(_config(tmp_path))
  assert (dataset.vocab_size, dataset.example_shape) == (27, (16,))
  # 18000 / 16 = 1125 chunks = 45 batches of 25.
  rows = np.concatenate([next(dataset.train)["x"] for _ in range(45)])
  expected = alphabet.encode(text.decode())[:18_000].reshape(1125, 16)
  order = np.lexsort(rows.T[::-1])
  np.testing.assert_array_equal(rows[order], expected[np.lexsort(expected.T[::-1])])
  assert not np.array_equal(rows, expected)  # Shuffled.
  eval_rows = np.concatenate([batch["x"] for batch in dataset.eval_batches()])
  np.testing.assert_array_equal(
      eval_rows, alphabet.encode(text.decode())[18_000:18_000 + 50 * 16].reshape(50, 16))
  test_config = _config(tmp_path, eval_split="test")
  first_test = next(data_lib.create(test_config).eval_batches())["x"][0]
  np.testing.assert_array_equal(first_test, alphabet.encode(text.decode())[19_000:19_016])


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "not_a_zip"])
def test_damaged_zip_is_rejected_with_a_clear_message(tmp_path, damage):
  path = _write_zip(tmp_path / "text8" / "text8.zip", _random_text(50_000))
  raw = bytearray(path.read_bytes())
  if damage == "truncate":
    raw = raw[:len(raw) // 2]
  elif damage == "corrupt":
    raw[len(raw) // 2] ^= 0xFF
  else:
    raw = b"<html>not found</html>"
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="text8.zip is corrupt or truncated.*download it again"):
    data_lib.create(_config(tmp_path))


def test_zip_without_the_text8_member_or_with_foreign_characters_is_rejected(tmp_path):
  _write_zip(tmp_path / "text8" / "text8.zip", b"abc", member="other")
  with pytest.raises(ValueError, match="no member 'text8'"):
    text8.read_ids(tmp_path / "text8" / "text8.zip")
  _write_zip(tmp_path / "text8" / "text8.zip", b"abc De")
  with pytest.raises(ValueError, match="character 'D' at byte offset 4"):
    text8.read_ids(tmp_path / "text8" / "text8.zip")


def test_without_download_a_missing_file_fails_at_once_saying_where_to_put_it(tmp_path):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError,
                     match=f"Put text8.zip .* at {re.escape(str(tmp_path / 'text8' / 'text8.zip'))}"):
    data_lib.create(_config(tmp_path))
  assert time.monotonic() - start < 1.0


@pytest.fixture
def silent_server():
  """A local address that accepts connections and never answers."""
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  yield f"http://127.0.0.1:{server.getsockname()[1]}/text8.zip"
  server.close()


def test_offline_download_fails_within_seconds_and_leaves_no_file(tmp_path, silent_server):
  config = _config(tmp_path / "cache", download=True, url=silent_server, timeout=1.0)
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match="downloading .* failed.*Put text8.zip"):
    data_lib.create(config)
  assert time.monotonic() - start < 10.0
  assert list((tmp_path / "cache" / "text8").iterdir()) == []


def test_refused_connection_fails_within_seconds(tmp_path):
  probe = socket.socket()
  probe.bind(("127.0.0.1", 0))
  url = f"http://127.0.0.1:{probe.getsockname()[1]}/text8.zip"
  probe.close()  # Nothing listens there now.
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "text8" / "text8.zip"))):
    text8.find_or_download(tmp_path / "text8", url=url, timeout=2.0)
  assert time.monotonic() - start < 10.0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


@pytest.fixture
def file_server(tmp_path):
  """Serves tmp_path/served over HTTP on localhost."""
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_download_checks_size_and_sha256_before_renaming(tmp_path, file_server):
  served, base = file_server
  content = _write_zip(served / "text8.zip", _random_text(1000)).read_bytes()
  sha256 = hashlib.sha256(content).hexdigest()
  target = tmp_path / "cache" / "text8.zip"

  with pytest.raises(ValueError, match="SHA-256"):
    text8.download(f"{base}/text8.zip", target, size=len(content), sha256="0" * 64)
  with pytest.raises(ValueError, match=f"gave {len(content)} bytes, expected {len(content) + 1}"):
    text8.download(f"{base}/text8.zip", target, size=len(content) + 1, sha256=sha256)
  assert list(target.parent.iterdir()) == []  # No .part and no text8.zip left.

  text8.download(f"{base}/text8.zip", target, size=len(content), sha256=sha256)
  assert target.read_bytes() == content
  assert list(target.parent.iterdir()) == [target]


def test_find_or_download_fetches_once_then_create_reads_it(tmp_path, file_server):
  served, base = file_server
  content = _write_zip(served / "text8.zip", _random_text(20_000)).read_bytes()
  checks = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
  path = text8.find_or_download(tmp_path / "cache" / "text8", url=f"{base}/text8.zip", **checks)
  assert path.read_bytes() == content
  (served / "text8.zip").unlink()  # A second call must not need the server.
  assert text8.find_or_download(tmp_path / "cache" / "text8", url=f"{base}/text8.zip", **checks) == path
  dataset = data_lib.create(_config(tmp_path / "cache"))
  assert next(dataset.train)["x"].shape == (25, 16)


def test_invalid_options_are_rejected(tmp_path):
  _write_zip(tmp_path / "text8" / "text8.zip", _random_text(20_000))
  with pytest.raises(ValueError, match="text8.eval_split"):
    data_lib.create(_config(tmp_path, eval_split="train"))
  with pytest.raises(ValueError, match="unknown config key 'text8.path'"):
    _config(tmp_path, path="x")
  with pytest.raises(ValueError, match="timeout must be > 0"):
    text8.download("http://127.0.0.1:9/x", tmp_path / "y", timeout=0)


def test_canonical_constants():
  assert text8.URL == "http://mattmahoney.net/dc/text8.zip"
  assert text8.ZIP_SIZE == 31_344_016
  assert len(text8.ZIP_SHA256) == 64


def test_a_character_outside_the_alphabet_is_named_with_its_offset():
  with pytest.raises(ValueError, match="character '9' at offset 3 is not in the text8 alphabet"):
    alphabet.encode("abc9")
  with pytest.raises(ValueError, match="character 'é' at offset 6 is not"):
    alphabet.encode("the caé")
  with pytest.raises(ValueError, match=r"byte 0xc3 \(of a non-ASCII character\) at byte offset 2"):
    alphabet.encode_bytes("caé".encode())
