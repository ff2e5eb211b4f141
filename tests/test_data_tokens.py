"""Tokenised corpora: SentencePiece, the memory-mapped stream, its manifest, packing."""

import io
import json
import os
import pathlib
import tarfile

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from md4 import data as data_lib
from md4.data import document_files
from md4.data import tokenizer
from md4.data import tokens
from tests import helpers

_WORDS = ("the cat dog sat on mat and ran far away from home when rain fell over hills "
          "quick brown fox jumps lazy river stone tree under light dark night day sun "
          "moon star sky blue green red small large old new first last").split()


def _documents(num_documents: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 30)))
          for _ in range(num_documents)]


@pytest.fixture
def corpus(tmp_path) -> tuple[pathlib.Path, list[str]]:
  documents = _documents(600)
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(documents) + "\n")
  return path, documents


def _options(path, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**tokens.OPTIONS, "path": str(path), "vocab_size": 120,
                                    **overrides})


def _config(path, data_dir, seq_len=32, batch_size=4, **options) -> ml_collections.ConfigDict:
  """Prepares into <data_dir>/tokens/corpus_sp_bpe120."""
  return helpers.data_config("tokens", data_dir=str(data_dir), seq_len=seq_len,
                             batch_size=batch_size, **{"path": str(path), "vocab_size": 120,
                                                       "validation_fraction": 0.1, **options})


@pytest.mark.parametrize("tokenizer_type, vocab_size", [("bpe", 120), ("unigram", 60)])
def test_sentencepiece_round_trip(tmp_path, corpus, tokenizer_type, vocab_size):
  path, documents = corpus
  options = _options(path, tokenizer_type=tokenizer_type, vocab_size=vocab_size)
  built = tokens.load_or_build(options, tmp_path / "out")
  processor = spm.SentencePieceProcessor(model_file=built.tokenizer.identity["model"])
  assert processor.get_piece_size() == vocab_size == built.vocab_size
  assert (processor.unk_id(), processor.eos_id(), built.eod_id) == (0, 1, 1)
  for document in documents[:50]:
    assert processor.decode(processor.encode(document)) == document
  # Fewer pieces than characters: the model learnt merges, not just characters.
  assert len(built.tokens) < 0.5 * sum(len(document) + 1 for document in documents)


def test_an_unknown_piece_decodes_to_the_replacement_character(tmp_path, corpus):
  path, documents = corpus
  trained = tokens.load_or_build(_options(path), tmp_path / "out").tokenizer
  (ids,) = trained.encode_batch([f"{documents[0]} \u2603"])  # A snowman: not in the corpus.
  assert 0 in ids  # <unk>
  decoded = trained.decode(ids)
  assert decoded == f"{documents[0]} {tokenizer.UNKNOWN_MARK}" and "\u2047" not in decoded


def test_packing_fills_every_slot_with_the_document_stream(tmp_path, corpus):
  path, documents = corpus
  built = tokens.load_or_build(_options(path), tmp_path / "out")
  processor = spm.SentencePieceProcessor(model_file=built.tokenizer.identity["model"])
  stream = []
  for document in documents:
    stream.extend(processor.encode(document) + [built.eod_id])
  np.testing.assert_array_equal(built.tokens, stream)
  assert built.tokens.dtype == np.uint16
  assert built.manifest["num_documents"] == len(documents)
  assert built.manifest["num_tokens"] == len(stream)

  seq_len = 32
  dataset = data_lib.create(_config(path, tmp_path / "out", seq_len=seq_len, batch_size=4))
  num_chunks = len(stream) // seq_len
  num_validation = round(num_chunks * 0.1)
  num_train = num_chunks - num_validation
  train_rows = np.concatenate([next(dataset.train)["x"] for _ in range(num_train // 4)])
  eval_rows = np.concatenate([batch["x"] for batch in dataset.eval_batches()])
  assert train_rows.shape == (num_train // 4 * 4, seq_len) and train_rows.dtype == np.int32
  # Every slot is a real token: rows are exact slices of the stream, with no padding id.
  chunks = np.asarray(stream[:num_chunks * seq_len]).reshape(num_chunks, seq_len)
  train_set = {bytes(row.astype(np.uint16)) for row in chunks[:num_train]}
  assert all(bytes(row.astype(np.uint16)) in train_set for row in train_rows)
  np.testing.assert_array_equal(eval_rows, chunks[num_train:num_train + len(eval_rows)])
  assert 0 <= train_rows.min() and train_rows.max() < dataset.vocab_size
  assert (train_rows == built.eod_id).sum() > 0  # Documents end inside sequences.
  # decode: one line per document end.
  text = dataset.decode(np.asarray(stream[:200]))
  assert text.split("\n")[:3] == documents[:3]


def test_manifest_reuse_and_rebuild(tmp_path, corpus):
  path, _ = corpus
  folder = tmp_path / "out"
  first = tokens.load_or_build(_options(path), folder)
  assert first.rebuilt
  manifest = json.loads((folder / tokens.MANIFEST).read_text())
  assert manifest["tokenizer_sha256"] == tokenizer.file_sha256(folder / tokens.TOKENIZER)
  assert manifest["num_tokens"] == len(first.tokens)
  stamp = (folder / tokens.TOKENS).stat().st_mtime_ns

  assert not tokens.load_or_build(_options(path), folder).rebuilt
  assert (folder / tokens.TOKENS).stat().st_mtime_ns == stamp

  assert tokens.load_or_build(_options(path, vocab_size=100), folder).rebuilt
  assert tokens.load_or_build(_options(path, vocab_size=100), folder).vocab_size == 100

  with open(path, "a") as file:
    file.write("a new document about the sun\n")
  rebuilt = tokens.load_or_build(_options(path, vocab_size=100), folder)
  assert rebuilt.rebuilt and rebuilt.manifest["num_documents"] == 601

  (folder / tokens.MANIFEST).write_text("{not json")
  assert tokens.load_or_build(_options(path, vocab_size=100), folder).rebuilt

  with open(folder / tokens.TOKENS, "ab") as file:
    file.write(b"\0\0")  # A tokens file of the wrong size.
  assert tokens.load_or_build(_options(path, vocab_size=100), folder).rebuilt

  with open(folder / tokens.TOKENIZER, "ab") as file:
    file.write(b"\0")  # A tokenizer that is not the one the tokens came from.
  assert tokens.load_or_build(_options(path, vocab_size=100), folder).rebuilt
  assert not tokens.load_or_build(_options(path, vocab_size=100), folder).rebuilt

  with pytest.raises(FileNotFoundError, match="md4.data.prepare"):
    tokens.load_or_build(_options(path, vocab_size=90), folder, allow_build=False)


def test_a_given_model_is_used_and_an_end_of_document_id_added_if_missing(tmp_path, corpus):
  path, documents = corpus
  model_prefix = tmp_path / "no_eos"
  spm.SentencePieceTrainer.train(
      input=str(path), model_prefix=str(model_prefix), vocab_size=80, model_type="bpe",
      eos_id=-1, bos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
  model = pathlib.Path(f"{model_prefix}.model")
  built = tokens.load_or_build(_options(path, tokenizer=str(model)), tmp_path / "out")
  assert (built.vocab_size, built.eod_id) == (81, 80)
  assert built.tokenizer.identity == {"kind": "sentencepiece", "model": str(model.resolve())}
  assert not (tmp_path / "out" / tokens.TOKENIZER).exists()
  assert (np.asarray(built.tokens) == 80).sum() == len(documents)
  decode = tokens.decoder(built.tokenizer)
  assert decode(built.tokens[:300]).split("\n")[:2] == documents[:2]

  # Retraining the given model in place changes its checksum: the tokens are rebuilt.
  spm.SentencePieceTrainer.train(
      input=str(path), model_prefix=str(model_prefix), vocab_size=70, model_type="bpe",
      eos_id=-1, bos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
  again = tokens.load_or_build(_options(path, tokenizer=str(model)), tmp_path / "out")
  assert again.rebuilt and (again.vocab_size, again.eod_id) == (71, 70)


@pytest.mark.parametrize("documents, content, expected", [
    ("line", "one doc\n\n  \nsecond doc\r\nthird", ["one doc", "second doc", "third"]),
    ("blank_line", "para one\nstill one\n\n\npara two\n", ["para one\nstill one", "para two"]),
    ("jsonl", '{"text": "a b"}\n\n{"text": "c\\nd", "id": 3}\n', ["a b", "c\nd"]),
    ("file", "whole\n\nfile\n", ["whole\n\nfile\n"]),
])
def test_document_formats(tmp_path, documents, content, expected):
  path = tmp_path / "corpus"
  path.write_bytes(content.encode("utf-8"))
  found = list(document_files.iter_documents([path], documents))
  assert [text for text, _ in found] == expected
  assert sum(consumed for _, consumed in found) == len(content.encode("utf-8"))


def _tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=mode) as archive:
    for name, content in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(content)
      archive.addfile(info, io.BytesIO(content))
  return buffer.getvalue()


OWT_TEXTS = ["First page.\n\n\n\nAfter four newlines.\n", "  Second page, caf\u00e9.  ",
             "Third\n\n\npage", "Fourth."]
# As the Hugging Face openwebtext builder gives them: runs of 3+ newlines -> 2, stripped.
OWT_DOCUMENTS = ["First page.\n\nAfter four newlines.", "Second page, caf\u00e9.",
                 "Third\n\npage", "Fourth."]


def test_openwebtext_archives_parquet_and_arrow_give_the_same_documents(tmp_path):
  # urlsf_subset00.tar holds .xz files, each an xz-compressed tar of .txt documents.
  def subset(texts, first):
    return _tar_bytes({f"{first + i:07d}-{i}.txt": text.encode() for i, text in
                       enumerate(texts)}, mode="w:xz")
  (tmp_path / "urlsf_subset00.tar").write_bytes(_tar_bytes({
      "openwebtext/urlsf_subset00-1_data.xz": subset(OWT_TEXTS[:3], 0),
      "openwebtext/._urlsf_subset00-1_data.xz": b"resource fork, skipped",
      "openwebtext/urlsf_subset00-2_data.xz": subset(OWT_TEXTS[3:], 3)}))
  found = list(document_files.iter_documents([tmp_path / "urlsf_subset00.tar"], "openwebtext"))
  assert [text for text, _ in found] == OWT_DOCUMENTS
  assert sum(read for _, read in found) <= (tmp_path / "urlsf_subset00.tar").stat().st_size

  table = pa.table({"text": OWT_DOCUMENTS})
  pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=2)
  with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=3)
  with pa.OSFile(str(tmp_path / "file-format.arrow"), "wb") as sink:
    with pa.ipc.new_file(sink, table.schema) as writer:
      writer.write_table(table)
  for name, documents in (("train-00000-of-00001.parquet", "parquet"),
                          ("data-00000-of-00001.arrow", "arrow"),
                          ("file-format.arrow", "arrow")):
    found = list(document_files.iter_documents([tmp_path / name], documents))
    assert [text for text, _ in found] == OWT_DOCUMENTS
    # Bytes read, for the progress bar: all of it, but an Arrow stream's few closing bytes.
    assert 0.9 < sum(read for _, read in found) / (tmp_path / name).stat().st_size <= 1

  pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
  with pytest.raises(ValueError, match="other.parquet: no column 'text'"):
    list(document_files.iter_documents([tmp_path / "other.parquet"], "parquet"))
  (tmp_path / "truncated.tar").write_bytes((tmp_path / "urlsf_subset00.tar").read_bytes()[:3000])
  with pytest.raises(ValueError, match="truncated.tar: a damaged or truncated archive"):
    list(document_files.iter_documents([tmp_path / "truncated.tar"], "openwebtext"))


def test_invalid_options_are_rejected(tmp_path, corpus):
  path, _ = corpus
  with pytest.raises(ValueError, match="tokens.documents"):
    tokens.load_or_build(_options(path, documents="pages"), tmp_path / "out")
  with pytest.raises(ValueError, match="tokens.tokenizer_type"):
    tokens.load_or_build(_options(path, tokenizer_type="wordpiece"), tmp_path / "out")
  with pytest.raises(ValueError, match="tokens.vocab_size=100000"):
    tokens.load_or_build(_options(path, vocab_size=100_000), tmp_path / "out")
  with pytest.raises(ValueError, match="tokens.tokenizer: no file"):
    tokens.load_or_build(_options(path, tokenizer=str(tmp_path / "none.model")),
                         tmp_path / "out")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
  with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON object"):
    list(document_files.iter_documents([tmp_path / "bad.jsonl"], "jsonl"))
  with pytest.raises(ValueError, match="unknown config key 'tokens.kind'"):
    _config(path, tmp_path / "out", kind="markov")


def test_token_dtype():
  assert tokens.token_dtype(65_536) == np.uint16
  assert tokens.token_dtype(65_537) == np.uint32


def test_build_leaves_no_partial_files(tmp_path, corpus):
  path, _ = corpus
  tokens.load_or_build(_options(path), tmp_path / "out")
  assert sorted(os.listdir(tmp_path / "out")) == sorted(
      [tokens.MANIFEST, tokens.TOKENIZER, tokens.TOKENS, tokens.DOCUMENT_ENDS])


def test_prepared_folder_is_named_by_its_tokenizer(tmp_path):
  def folder_name(**options) -> str:
    return tokens.folder(_config("corpus.txt", tmp_path, **options)).name

  assert folder_name() == "corpus_sp_bpe120"
  assert folder_name(tokenizer_type="unigram", vocab_size=60) == "corpus_sp_unigram60"
  assert folder_name(tokenizer="tiktoken:gpt2") == "corpus_gpt2"
  assert folder_name(tokenizer="~/models/gpt2/tokenizer.json") == "corpus_gpt2"
  assert folder_name(tokenizer="/models/wiki32k.model") == "corpus_wiki32k"


@pytest.mark.parametrize("text, too_long", [("", 0), ("\n\n", 0), ("x" * 20000 + "\n", 1)])
def test_a_corpus_with_no_usable_line_says_so(tmp_path, text, too_long):
  path = tmp_path / "corpus.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=f"has no line to train a tokenizer on: {too_long} line"):
    tokens.load_or_build(_options(path), tmp_path / "out")


def test_plain_text_read_as_openwebtext_archives_points_at_tokens_documents(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("Some plain text.\nMore of it.\n")
  with pytest.raises(ValueError, match="not a tar archive .* set tokens.documents to its format"):
    tokens.load_or_build(_options(path, documents="openwebtext"), tmp_path / "out")
