"""The W&B writer, in W&B's offline mode: nothing leaves the machine.

The offline run's records are read back from its .wandb file, a LevelDB-style
log of W&B's Record protos (blocks of 32 KiB, each record in fragments with a
7-byte header: CRC-32C, length, type), after W&B's 7-byte file header.
"""

import json
import pathlib
import struct

import pytest

from md4 import train
from tests.test_train import tiny_config

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top,wrong-import-position

_FILE_HEADER, _BLOCK, _FRAGMENT_HEADER = 7, 32768, 7
_FULL, _LAST = 1, 4


def _records(path: pathlib.Path) -> list[wandb_internal_pb2.Record]:
  data = path.read_bytes()
  assert data.startswith(b":W&B")
  records, fragments, position = [], b"", _FILE_HEADER
  while position + _FRAGMENT_HEADER <= len(data):
    if _BLOCK - position % _BLOCK < _FRAGMENT_HEADER:  # A block's tail too short for a header.
      position += _BLOCK - position % _BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[position:position + _FRAGMENT_HEADER])
    position += _FRAGMENT_HEADER
    if kind == 0:
      break
    fragments += data[position:position + length]
    position += length
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(fragments)
      records.append(record)
      fragments = b""
  return records


def _history(run_dir: pathlib.Path) -> dict[int, dict[str, object]]:
  """{step: {key: value}} of the run's logged rows."""
  (path,) = run_dir.glob("*.wandb")
  rows = {}
  for record in _records(path):
    if record.WhichOneof("record_type") == "history":
      row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
      rows[row["_step"]] = row
  return rows


def test_offline_run_gets_the_scalars_samples_and_curves(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  config = tiny_config(writers="tensorboard,wandb")
  config.wandb.mode = "offline"
  train.train_and_evaluate(config, tmp_path)
  run_id = (tmp_path / "wandb" / "run_id").read_text()
  (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
  history = _history(run_dir)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
  assert sorted(history) == sorted({record["step"] for record in records}) == [2, 4]
  for record in records:
    logged = history[record["step"]]
    for name, value in record.items():
      if name != "step":
        assert logged[name] == pytest.approx(value, rel=1e-6), name
  final = history[4]
  assert final["samples/text/_type"] == "table-file"
  table = json.loads((run_dir / "files" / final["samples/text/path"]).read_text())
  written = (tmp_path / "samples" / "step_4.txt").read_text().splitlines()
  assert [row[0] for row in table["data"]] == written
  assert final["curves/_type"] == "image-file"
  assert (run_dir / "files" / final["curves/path"]).is_file()


def test_an_unknown_writer_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match="config.writers: unknown writer 'wandbb'"):
    train.train_and_evaluate(tiny_config(writers="tensorboard,wandbb"), tmp_path)
  assert not (tmp_path / "checkpoints").exists()
