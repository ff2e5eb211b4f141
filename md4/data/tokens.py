"""Tokenised corpora (OpenWebText-style): SentencePiece, GPT-2 (tokenizer.json or tiktoken).

One-off preparation, into `<config.data_dir>/tokens/<name>_<tokenizer>` (`folder`):
  tokenizer.model  a SentencePiece model trained on the corpus (BPE or unigram,
                   tokens.vocab_size pieces, id 0 = <unk>, id 1 = </s> = end of
                   document), unless tokens.tokenizer names one to load: a
                   SentencePiece .model, a Hugging Face tokenizer.json (GPT-2's)
                   or tiktoken:gpt2 (`md4.data.tokenizer`);
  tokens.bin       every document's ids followed by the end-of-document id,
                   concatenated, as uint16 (vocabulary <= 65536) or uint32;
  documents.bin    where each document ends in tokens.bin, uint64 [documents];
  manifest.json    what the files were built from (corpus paths, sizes and
                   mtimes, document format, tokenizer settings and SHA-256) and
                   their counts. The files are reused while it matches and
                   rebuilt when it does not; it is written last, so a build that
                   stopped halfway is never taken for a finished one.

Corpus formats (tokens.documents): text files (a document per line, per
blank-line-separated block, per file, per jsonl object) and, read without
the `datasets` library (`md4.data.document_files`), a Hugging Face dataset's
parquet shards or Arrow files, and OpenWebText's own archives.

The token stream is packed into non-overlapping sequences of seq_len ids, so
every slot holds a real token and documents run across sequence boundaries.
Held out: the last tokens.validation_documents documents when > 0 (MDLM's
OpenWebText split holds out the last 100,000), packed apart from the rest;
else the last tokens.validation_fraction of the sequences.

`python -m md4.data.prepare --config=...` runs the preparation with a
progress bar; `create` runs it when needed in a single-process job.
"""

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import chars
from md4.data import document_files
from md4.data import pipeline
from md4.data import tokenizer as tokenizer_lib
from md4.runtime import progress as progress_lib

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENS = "tokens.bin"
DOCUMENT_ENDS = "documents.bin"
_FORMAT_VERSION = 2
_ENCODE_BATCH_BYTES = 1 << 23

OPTIONS = {
    "name": "corpus",          # The corpus's name: prepared into <data_dir>/tokens/<name>_<tokenizer>.
    "path": "",                # Corpus: a file or a glob pattern (UTF-8).
    "documents": "line",       # line: one per line; blank_line: separated by blank lines;
                               # file: one per file; jsonl: one JSON object per line, key "text";
                               # parquet, arrow: one per row of column "text"; openwebtext:
                               # each .txt in OpenWebText's (nested) tar archives.
    "tokenizer": "",           # A SentencePiece .model, a tokenizer.json, or tiktoken:gpt2;
                               # empty: train a SentencePiece model on the corpus.
    "tiktoken_dir": "",        # tiktoken:gpt2 offline: a folder with GPT-2's encoder.json and
                               # vocab.bpe; empty: tiktoken's cache ($TIKTOKEN_CACHE_DIR).
    "tokenizer_type": "bpe",   # bpe or unigram, when training.
    "vocab_size": 32768,       # Pieces, <unk> and </s> included, when training.
    "max_training_sentences": 1_000_000,  # Lines sampled from the corpus to train on.
    "validation_fraction": 0.01,          # Share of the sequences held out, from the end.
    "validation_documents": 0,            # > 0: hold out the last this many documents instead.
}


@dataclasses.dataclass
class TokenCorpus:
  """A prepared corpus.

  Attributes:
    tokens: the packed token stream, memory-mapped [N].
    document_ends: where each document ends in tokens, memory-mapped [D].
    tokenizer: the tokenizer that made it.
    vocab_size: number of ids, the end-of-document id included.
    eod_id: the end-of-document id.
    manifest: the manifest.json contents.
    rebuilt: whether this call built the files (False: reused).
  """

  tokens: np.ndarray
  document_ends: np.ndarray
  tokenizer: tokenizer_lib.Tokenizer
  vocab_size: int
  eod_id: int
  manifest: dict[str, Any]
  rebuilt: bool


def _write_atomic(path: pathlib.Path, content: bytes) -> None:
  part = path.with_name(path.name + ".part")
  part.write_bytes(content)
  os.replace(part, path)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenise(paths: Sequence[pathlib.Path], documents: str,
             tokenizer: tokenizer_lib.Tokenizer, dtype: np.dtype, out_path: pathlib.Path,
             ends_path: pathlib.Path, progress: bool = False) -> tuple[int, int]:
  """Writes the documents' ids, each followed by the end-of-document id, to out_path.

  ends_path gets where each document ends, uint64 [documents]. Returns (tokens, documents).
  """
  total = sum(path.stat().st_size for path in paths)
  num_tokens = num_documents = 0
  with (open(out_path, "wb") as out, open(ends_path, "wb") as ends,
        progress_lib.bar(total, "tokenising", "B", enabled=progress, unit_scale=True) as bar):
    batch, batch_bytes, batch_consumed = [], 0, 0

    def flush():
      nonlocal num_tokens, num_documents
      encoded = tokenizer.encode_batch(batch)
      lengths = np.asarray([len(ids) + 1 for ids in encoded], np.uint64)
      stream = []
      for ids in encoded:
        stream.extend(ids)
        stream.append(tokenizer.eod_id)
      np.asarray(stream, dtype=dtype).tofile(out)
      (num_tokens + np.cumsum(lengths)).astype(np.uint64).tofile(ends)
      num_tokens += len(stream)
      num_documents += len(batch)
      bar.update(batch_consumed)

    for document, consumed in document_files.iter_documents(paths, documents):
      batch.append(document)
      batch_bytes += len(document)
      batch_consumed += consumed
      if batch_bytes >= _ENCODE_BATCH_BYTES:
        flush()
        batch, batch_bytes, batch_consumed = [], 0, 0
    if batch:
      flush()
  return num_tokens, num_documents


def load_tokenizer(options: ml_collections.ConfigDict, folder: pathlib.Path
                   ) -> tokenizer_lib.Tokenizer:
  """The tokenizer options name, or the SentencePiece model trained into folder."""
  return tokenizer_lib.load(options.tokenizer or str(folder / TOKENIZER), options.tiktoken_dir)


def _build_key(options: ml_collections.ConfigDict, paths: Sequence[pathlib.Path],
               given: tokenizer_lib.Tokenizer | None) -> dict[str, Any]:
  """What the prepared files depend on; a manifest with another key is stale."""
  if given is not None:
    tokenizer = {**given.identity, "sha256": given.sha256}
  else:
    tokenizer = {"type": options.tokenizer_type, "vocab_size": options.vocab_size,
                 "max_training_sentences": options.max_training_sentences}
  corpus = []
  for path in paths:
    stat = path.stat()
    corpus.append({"path": str(path.resolve()), "size": stat.st_size,
                   "mtime_ns": stat.st_mtime_ns})
  return {"format_version": _FORMAT_VERSION, "corpus": corpus,
          "documents": options.documents, "tokenizer": tokenizer}


def _manifest_or_none(folder: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads((folder / MANIFEST).read_text())
  except (OSError, ValueError):
    return None


def _is_current(manifest: dict[str, Any] | None, key: dict[str, Any], folder: pathlib.Path,
                given: tokenizer_lib.Tokenizer | None) -> bool:
  if manifest is None or any(manifest.get(name) != value for name, value in key.items()):
    return False
  try:
    expected_size = manifest["num_tokens"] * np.dtype(manifest["dtype"]).itemsize
    sha256 = (given.sha256 if given is not None
              else tokenizer_lib.file_sha256(folder / TOKENIZER))
    return ((folder / TOKENS).stat().st_size == expected_size
            and (folder / DOCUMENT_ENDS).stat().st_size == 8 * manifest["num_documents"]
            and sha256 == manifest["tokenizer_sha256"])
  except (OSError, KeyError, TypeError):
    return False


def load_or_build(options: ml_collections.ConfigDict, folder: str | os.PathLike,
                  *, progress: bool = False, allow_build: bool = True) -> TokenCorpus:
  """The prepared corpus in `folder`, rebuilt first if its manifest does not match."""
  if options.documents not in document_files.DOCUMENT_FORMATS:
    raise ValueError(f"tokens.documents must be one of {document_files.DOCUMENT_FORMATS}, "
                     f"got {options.documents!r}")
  folder = pathlib.Path(folder).expanduser()
  paths = chars.resolve_paths(options.path, "tokens.path")
  given = load_tokenizer(options, folder) if options.tokenizer else None
  key = _build_key(options, paths, given)
  manifest = _manifest_or_none(folder)
  rebuilt = not _is_current(manifest, key, folder, given)
  if rebuilt:
    if not allow_build:
      raise FileNotFoundError(
          f"{folder} holds no tokenised corpus matching the config; run "
          "`python -m md4.data.prepare --config=...` once before a multi-process job")
    manifest = _build(options, paths, key, folder, given, progress)
  if manifest["num_tokens"] == 0:
    raise ValueError(f"tokens.path={options.path!r} holds no documents")
  tokens = np.memmap(folder / TOKENS, dtype=np.dtype(manifest["dtype"]), mode="r",
                     shape=(manifest["num_tokens"],))
  document_ends = np.memmap(folder / DOCUMENT_ENDS, dtype=np.uint64, mode="r",
                            shape=(manifest["num_documents"],))
  return TokenCorpus(tokens=tokens, document_ends=document_ends,
                     tokenizer=given or load_tokenizer(options, folder),
                     vocab_size=manifest["vocab_size"], eod_id=manifest["eod_id"],
                     manifest=manifest, rebuilt=rebuilt)


def _build(options: ml_collections.ConfigDict, paths: Sequence[pathlib.Path],
           key: dict[str, Any], folder: pathlib.Path, given: tokenizer_lib.Tokenizer | None,
           progress: bool) -> dict[str, Any]:
  logging.info("Preparing the token corpus in %s", folder)
  folder.mkdir(parents=True, exist_ok=True)
  # The manifest goes first and comes back last: a half-built folder never matches.
  (folder / MANIFEST).unlink(missing_ok=True)
  if given is None:
    model = tokenizer_lib.train_sentencepiece(
        paths, options.documents, vocab_size=options.vocab_size,
        tokenizer_type=options.tokenizer_type, max_sentences=options.max_training_sentences,
        progress=progress)
    _write_atomic(folder / TOKENIZER, model)
  tokenizer = given or load_tokenizer(options, folder)
  dtype = token_dtype(tokenizer.vocab_size)
  parts = folder / (TOKENS + ".part"), folder / (DOCUMENT_ENDS + ".part")
  num_tokens, num_documents = tokenise(paths, options.documents, tokenizer, dtype, *parts,
                                       progress=progress)
  os.replace(parts[0], folder / TOKENS)
  os.replace(parts[1], folder / DOCUMENT_ENDS)
  manifest = {**key, "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
              "eod_id": tokenizer.eod_id, "dtype": dtype.name, "num_tokens": num_tokens,
              "num_documents": num_documents}
  _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
  return manifest


def decoder(tokenizer: tokenizer_lib.Tokenizer):
  """Maps ids [...] to text, one line per document end."""
  documents = documents_decoder(tokenizer)
  return lambda ids: "\n".join(documents(ids))


def documents_decoder(tokenizer: tokenizer_lib.Tokenizer):
  """Maps ids [...] to its documents' texts, split at the end-of-document id."""

  def decode_documents(ids: np.ndarray) -> list[str]:
    ids = np.asarray(ids).reshape(-1).tolist()
    documents, current = [], []
    for token in ids:
      if token == tokenizer.eod_id:
        documents.append(current)
        current = []
      elif 0 <= token < tokenizer.vocab_size:
        current.append(token)
      else:
        raise ValueError(f"id {token} is outside the vocabulary [0, {tokenizer.vocab_size})")
    documents.append(current)
    return [tokenizer.decode(document) for document in documents]

  return decode_documents


def encode_documents(tokenizer: tokenizer_lib.Tokenizer, documents: Sequence[str]
                     ) -> np.ndarray:
  """One stream int32 [N]: each document's ids followed by the end-of-document id."""
  stream = []
  for ids in tokenizer.encode_batch(documents):
    stream.extend(ids)
    stream.append(tokenizer.eod_id)
  return np.asarray(stream, np.int32)


def tokenizer_name(options: ml_collections.ConfigDict) -> str:
  """The tokenizer's short name: gpt2 for tiktoken:gpt2, a given file's name (its folder's for
  tokenizer.json or tokenizer.model), or sp_<type><vocab_size> for a model trained on the corpus."""
  if not options.tokenizer:
    return f"sp_{options.tokenizer_type}{options.vocab_size}"
  if options.tokenizer.startswith(tokenizer_lib.TIKTOKEN_PREFIX):
    return options.tokenizer[len(tokenizer_lib.TIKTOKEN_PREFIX):]
  path = pathlib.Path(options.tokenizer).expanduser()
  return path.parent.name if path.stem == "tokenizer" else path.stem


def folder(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where the prepared corpus lives: <config.data_dir>/tokens/<tokens.name>_<tokenizer name>."""
  name = f"{config.tokens.name}_{tokenizer_name(config.tokens)}"
  return pathlib.Path(config.data_dir).expanduser() / "tokens" / name


def read_manifest(corpus_dir: pathlib.Path, what: str) -> dict[str, Any]:
  """The manifest of a prepared corpus; ValueError naming `what` if there is none."""
  try:
    manifest = json.loads((corpus_dir / MANIFEST).read_text())
  except (OSError, ValueError) as error:
    raise ValueError(f"{what}: {corpus_dir} is not a corpus prepared by md4.data.tokens "
                     f"(cannot read {MANIFEST}: {error})") from error
  if "tokenizer_sha256" not in manifest:
    raise ValueError(f"{what}: {corpus_dir / MANIFEST} has no tokenizer_sha256")
  return manifest


def _tokenizer_option(identity: dict[str, str]) -> str:
  """The tokens.tokenizer value that loads the tokenizer of a manifest's identity."""
  if "model" in identity:
    return identity["model"]
  return tokenizer_lib.TIKTOKEN_PREFIX + identity["name"]


def _read_other_text(path: str, corpus: TokenCorpus, documents: str) -> np.ndarray:
  """ids int32 [N] of a text file (tokenised like the corpus) or of a prepared corpus folder.

  A folder must have been tokenised with the training corpus's tokenizer (same SHA-256).
  """
  location = pathlib.Path(path).expanduser()
  if not location.is_dir():
    paths = chars.resolve_paths(path, "text file")
    texts = [text for text, _ in document_files.iter_documents(paths, documents)]
    return encode_documents(corpus.tokenizer, texts)
  manifest = read_manifest(location, path)
  if manifest["tokenizer_sha256"] != corpus.manifest["tokenizer_sha256"]:
    raise ValueError(
        f"{path} was tokenised with a different tokenizer (SHA-256 "
        f"{manifest['tokenizer_sha256'][:12]}...) than the model's (SHA-256 "
        f"{corpus.manifest['tokenizer_sha256'][:12]}...): prepare it with "
        f"tokens.tokenizer={_tokenizer_option(corpus.tokenizer.identity)!r}")
  if manifest["vocab_size"] != corpus.vocab_size:
    raise ValueError(f"{path} has vocab_size {manifest['vocab_size']}, the model "
                     f"{corpus.vocab_size}")
  return np.memmap(location / TOKENS, dtype=np.dtype(manifest["dtype"]), mode="r",
                   shape=(manifest["num_tokens"],))


def split_sources(corpus: TokenCorpus, length: int, options: ml_collections.ConfigDict
                  ) -> tuple[pipeline.ChunkSource, pipeline.ChunkSource]:
  """(train, validation) chunks of `length` ids: the held-out documents packed apart, or
  the last validation_fraction of the chunks."""
  held_out = options.validation_documents
  if held_out <= 0:
    num_train, num_validation = pipeline.split_chunks(
        len(corpus.tokens), length, options.validation_fraction, "tokens.validation_fraction")
    return (pipeline.ChunkSource(corpus.tokens, length, 0, num_train),
            pipeline.ChunkSource(corpus.tokens, length, num_train * length, num_validation))
  num_documents = len(corpus.document_ends)
  if held_out >= num_documents:
    raise ValueError(f"tokens.validation_documents={held_out} leaves no training document "
                     f"of the {num_documents}: lower it, or use more data")
  boundary = int(corpus.document_ends[num_documents - held_out - 1])
  train = pipeline.ChunkSource(corpus.tokens[:boundary], length)
  validation = pipeline.ChunkSource(corpus.tokens[boundary:], length)
  if len(train) < 1 or len(validation) < 1:
    raise ValueError(
        f"tokens.validation_documents={held_out}: {boundary} training and "
        f"{len(corpus.tokens) - boundary} held-out tokens make {len(train)} and "
        f"{len(validation)} sequences of seq_len={length} (each needs >= 1)")
  return train, validation


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Sequences of config.seq_len ids from the prepared corpus in `folder(config)`."""
  options = config.tokens
  corpus = load_or_build(options, folder(config), allow_build=jax.process_count() == 1)
  length = config.seq_len
  if length < 1:
    raise ValueError(f"seq_len must be >= 1, got {length}")
  train, validation = split_sources(corpus, length, options)
  return data_lib.Dataset(
      train=pipeline.train_iterator(train, config.batch_size, config.seed),
      eval_batches=pipeline.eval_iterator_fn(validation, config.batch_size),
      vocab_size=corpus.vocab_size,
      example_shape=(length,),
      decode=decoder(corpus.tokenizer),
      decode_documents=documents_decoder(corpus.tokenizer),
      encode=lambda text: np.asarray(corpus.tokenizer.encode_batch([text])[0], np.int32),
      read_text=lambda path: _read_other_text(path, corpus, options.documents),
      word_pieces=True,
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, Any]:
  """Trains the tokenizer (unless given) and tokenises the corpus, unless already current."""
  corpus = load_or_build(config.tokens, folder(config), progress=progress)
  return {"folder": str(folder(config)), "rebuilt": corpus.rebuilt,
          "tokenizer": corpus.tokenizer.identity,
          "vocab_size": corpus.vocab_size, "eod_id": corpus.eod_id,
          "tokens": corpus.manifest["num_tokens"],
          "documents": corpus.manifest["num_documents"]}


# Vocabulary sizes of named tokenizers, so that a slice can be checked before any download.
KNOWN_VOCAB_SIZES = {"tiktoken:gpt2": 50257}


def shapes(config: ml_collections.ConfigDict) -> data_lib.Shapes:
  """The prepared corpus's vocabulary if there is one, else what the tokenizer settings give."""
  options = config.tokens
  manifest = _manifest_or_none(folder(config))
  if manifest is not None:
    vocab_size = manifest["vocab_size"]
  elif options.tokenizer in KNOWN_VOCAB_SIZES:
    vocab_size = KNOWN_VOCAB_SIZES[options.tokenizer]
  elif options.tokenizer:
    vocab_size = tokenizer_lib.load(options.tokenizer, options.tiktoken_dir).vocab_size
  else:
    vocab_size = options.vocab_size  # The trained SentencePiece model's pieces, </s> included.
  return data_lib.Shapes(vocab_size, (config.seq_len,))


SOURCE = data_lib.register(data_lib.Source("tokens", OPTIONS, create, prepare, shapes))
