"""A resumed pipeline yields exactly the batches an uninterrupted one would.

Checked for every source through get_state / set_state and through an Orbax
CheckpointManager with grain's checkpoint handler, across epoch boundaries;
and the per-process shards of a global batch are the rows the single-process
pipeline would read.
"""

import contextlib
import zipfile

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from md4 import data as data_lib
from md4.data import alphabet
from tests import helpers

_TOTAL, _INTERRUPT = 20, 13


def _config(dataset, data_dir="", seq_len=16, **options) -> ml_collections.ConfigDict:
  return helpers.data_config(dataset, data_dir=data_dir, seq_len=seq_len, batch_size=8,
                             seed=7, **options)


@pytest.fixture(params=["chars", "text8", "tokens", "synthetic", "cifar10"])
def make_dataset(request, tmp_path):
  """A function that builds the same dataset afresh each call (a new process, as it were)."""
  rng = np.random.default_rng(0)
  text = alphabet.decode(rng.integers(0, 27, 2000)).strip() + "x"
  name = request.param
  if name == "chars":
    (tmp_path / "a.txt").write_text(text)
    config = _config("chars", path=str(tmp_path / "a.txt"), strict=True)
  elif name == "text8":
    (tmp_path / "text8").mkdir()
    with zipfile.ZipFile(tmp_path / "text8" / "text8.zip", "w") as archive:
      archive.writestr("text8", text)
    config = _config("text8", data_dir=str(tmp_path), seq_len=8, download=False)
  elif name == "tokens":
    words = np.array("alpha beta gamma delta epsilon zeta eta theta".split())
    lines = [" ".join(rng.choice(words, size=rng.integers(2, 12))) for _ in range(300)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    config = _config("tokens", data_dir=str(tmp_path), path=str(tmp_path / "corpus.txt"),
                     vocab_size=40, validation_fraction=0.2)
  elif name == "synthetic":
    config = _config("synthetic", num_eval_examples=16)
  else:
    config = _config("cifar10", random_flip=True, source="tfds")
  with contextlib.ExitStack() as stack:
    if name == "cifar10":
      stack.enter_context(tfds.testing.mock_data(num_examples=40))
    yield lambda: data_lib.create(config)


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _assert_same(actual, expected):
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_get_state_set_state(make_dataset):
  uninterrupted = _take(make_dataset().train, _TOTAL)
  first = make_dataset()
  head = _take(first.train, _INTERRUPT)
  state = first.train.get_state()
  _take(first.train, 2)  # Running on past the save must not matter.
  resumed = make_dataset()
  resumed.train.set_state(state)
  _assert_same(head + _take(resumed.train, _TOTAL - _INTERRUPT), uninterrupted)
  assert not all(np.array_equal(a["x"], b["x"]) for a, b in zip(uninterrupted, uninterrupted[1:]))


def test_orbax_checkpoint_manager(make_dataset, tmp_path):
  uninterrupted = _take(make_dataset().train, _TOTAL)
  first = make_dataset()
  head = _take(first.train, _INTERRUPT)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(_INTERRUPT, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(first.train)))
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    resumed = make_dataset()
    manager.restore(manager.latest_step(), args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed.train)))
  _assert_same(head + _take(resumed.train, _TOTAL - _INTERRUPT), uninterrupted)


def test_eval_batches_are_the_same_every_pass(make_dataset):
  dataset = make_dataset()
  _assert_same(list(dataset.eval_batches()), list(dataset.eval_batches()))


def test_process_shards_partition_the_global_batch(make_dataset, monkeypatch):
  global_batches = _take(make_dataset().train, 6)
  num_processes = 2
  monkeypatch.setattr(jax, "process_count", lambda: num_processes)
  for process in range(num_processes):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    local_batches = _take(make_dataset().train, 6)
    for local, full in zip(local_batches, global_batches):
      for key in full:
        # Process p reads the p-th contiguous block of the global batch.
        blocks = np.split(full[key], num_processes)
        np.testing.assert_array_equal(local[key], blocks[process])
