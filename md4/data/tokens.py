"""Tokenised corpora (OpenWebText-style) with SentencePiece.

One-off preparation, into `<config.data_dir>/tokens/<config.tokens.name>`:
  tokenizer.model  a SentencePiece model trained on the corpus (BPE or unigram,
                   tokens.vocab_size pieces, id 0 = <unk>, id 1 = </s> = end of
                   document), unless tokens.tokenizer names a `.model` to load;
  tokens.bin       every document's ids followed by the end-of-document id,
                   concatenated, as uint16 (vocabulary <= 65536) or uint32;
  manifest.json    what the files were built from (corpus paths, sizes and
                   mtimes, document format, tokenizer settings and SHA-256) and
                   their counts. The files are reused while it matches and
                   rebuilt when it does not; it is written last, so a build that
                   stopped halfway is never taken for a finished one.

A loaded model without an end-of-sentence piece gets an extra id
(= its piece count) for the end of a document. The token stream is packed
into non-overlapping sequences of seq_len ids, so every slot holds a real
token and documents run across sequence boundaries; the last
tokens.validation_fraction of the sequences is held out.

`python -m md4.data.prepare --config=...` runs the preparation with a
progress bar; `create` runs it when needed in a single-process job.
"""

import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from md4 import data as data_lib
from md4.data import chars
from md4.data import pipeline

DOCUMENT_FORMATS = ("line", "blank_line", "file", "jsonl")
TOKENIZER_TYPES = ("bpe", "unigram")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENS = "tokens.bin"
_FORMAT_VERSION = 1
_UNK_ID, _EOS_ID = 0, 1
_ENCODE_BATCH_BYTES = 1 << 23
_MAX_SENTENCE_BYTES = 1 << 14

OPTIONS = {
    "name": "corpus",          # The folder <data_dir>/tokens/<name> of the prepared files.
    "path": "",                # Corpus: a file or a glob pattern (UTF-8).
    "documents": "line",       # line: one per line; blank_line: separated by blank lines;
                               # file: one per file; jsonl: one JSON object per line, key "text".
    "tokenizer": "",           # A SentencePiece .model to load; empty: train one on the corpus.
    "tokenizer_type": "bpe",   # bpe or unigram, when training.
    "vocab_size": 32768,       # Pieces, <unk> and </s> included, when training.
    "max_training_sentences": 1_000_000,  # Lines sampled from the corpus to train on.
    "validation_fraction": 0.01,          # Share of the sequences held out, from the end.
}


@dataclasses.dataclass
class TokenCorpus:
  """A prepared corpus.

  Attributes:
    tokens: the packed token stream, memory-mapped [N].
    tokenizer_path: the SentencePiece model that made it.
    vocab_size: number of ids, the end-of-document id included.
    eod_id: the end-of-document id.
    manifest: the manifest.json contents.
    rebuilt: whether this call built the files (False: reused).
  """

  tokens: np.ndarray
  tokenizer_path: pathlib.Path
  vocab_size: int
  eod_id: int
  manifest: dict[str, Any]
  rebuilt: bool


def iter_documents(paths: Sequence[pathlib.Path], documents: str
                   ) -> Iterator[tuple[str, int]]:
  """(document text, input bytes consumed since the previous one); empty documents skipped."""
  if documents not in DOCUMENT_FORMATS:
    raise ValueError(f"tokens.documents must be one of {DOCUMENT_FORMATS}, got {documents!r}")
  for path in paths:
    if documents == "file":
      text = chars.read_text(path)
      if text.strip():
        yield text, path.stat().st_size
      continue
    pending, consumed = [], 0
    with open(path, "rb") as file:
      for number, raw in enumerate(file, start=1):
        consumed += len(raw)
        try:
          line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
          raise ValueError(f"{path}:{number}: not UTF-8 ({error.reason})") from error
        if documents == "jsonl":
          if not line.strip():
            continue
          try:
            text = json.loads(line)["text"]
          except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a JSON object with a 'text' string "
                             f"({error!r})") from error
          if text.strip():
            yield text, consumed
            consumed = 0
        elif documents == "line":
          if line.strip():
            yield line, consumed
            consumed = 0
        elif line.strip():
          pending.append(line)
        elif pending:
          yield "\n".join(pending), consumed
          pending, consumed = [], 0
    if pending:
      yield "\n".join(pending), consumed


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    while chunk := file.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _progress(total: int, description: str, enabled: bool):
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc=description, unit="B", unit_scale=True,
                   disable=not enabled)


def train_tokenizer(paths: Sequence[pathlib.Path], documents: str, model_path: pathlib.Path,
                    *, vocab_size: int, tokenizer_type: str, max_sentences: int,
                    progress: bool = False) -> None:
  """Trains a SentencePiece model on the lines of the corpus and writes it to model_path."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if tokenizer_type not in TOKENIZER_TYPES:
    raise ValueError(f"tokens.tokenizer_type must be one of {TOKENIZER_TYPES}, "
                     f"got {tokenizer_type!r}")
  if vocab_size < 3:
    raise ValueError(f"tokens.vocab_size must be >= 3, got {vocab_size}")
  if max_sentences < 1:
    raise ValueError(f"tokens.max_training_sentences must be >= 1, got {max_sentences}")
  total = sum(path.stat().st_size for path in paths)

  def sentences() -> Iterator[str]:
    with _progress(total, "training tokenizer", progress) as bar:
      for document, consumed in iter_documents(paths, documents):
        bar.update(consumed)
        yield from (line for line in document.split("\n") if line.strip())

  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # Sentence sampling: the same corpus gives the same model.
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
        model_type=tokenizer_type, character_coverage=0.9995,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES, unk_id=_UNK_ID, eos_id=_EOS_ID,
        bos_id=-1, pad_id=-1, num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as error:
    raise ValueError(f"SentencePiece could not train a {tokenizer_type} model with "
                     f"tokens.vocab_size={vocab_size} on {len(paths)} file(s): {error}") from error
  _write_atomic(model_path, model.getvalue())


def _write_atomic(path: pathlib.Path, content: bytes) -> None:
  part = path.with_name(path.name + ".part")
  part.write_bytes(content)
  os.replace(part, path)


def _load_processor(path: pathlib.Path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  try:
    return spm.SentencePieceProcessor(model_file=str(path))
  except (OSError, RuntimeError) as error:
    raise ValueError(f"tokens.tokenizer: cannot load a SentencePiece model from {path} "
                     f"({error})") from error


def vocabulary(processor) -> tuple[int, int]:
  """(vocab_size, end-of-document id) of a SentencePiece processor."""
  pieces = processor.get_piece_size()
  if processor.eos_id() >= 0:
    return pieces, processor.eos_id()
  return pieces + 1, pieces


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenise(paths: Sequence[pathlib.Path], documents: str, processor, eod_id: int,
             dtype: np.dtype, out_path: pathlib.Path, progress: bool = False
             ) -> tuple[int, int]:
  """Writes each document's ids and eod_id to out_path; returns (tokens, documents)."""
  total = sum(path.stat().st_size for path in paths)
  threads = os.cpu_count() or 1
  num_tokens = num_documents = 0
  with open(out_path, "wb") as out, _progress(total, "tokenising", progress) as bar:
    batch, batch_bytes, batch_consumed = [], 0, 0

    def flush():
      nonlocal num_tokens, num_documents
      stream = []
      for ids in processor.encode(batch, out_type=int, num_threads=threads):
        stream.extend(ids)
        stream.append(eod_id)
      np.asarray(stream, dtype=dtype).tofile(out)
      num_tokens += len(stream)
      num_documents += len(batch)
      bar.update(batch_consumed)

    for document, consumed in iter_documents(paths, documents):
      batch.append(document)
      batch_bytes += len(document)
      batch_consumed += consumed
      if batch_bytes >= _ENCODE_BATCH_BYTES:
        flush()
        batch, batch_bytes, batch_consumed = [], 0, 0
    if batch:
      flush()
  return num_tokens, num_documents


def _build_key(options: ml_collections.ConfigDict, paths: Sequence[pathlib.Path]
               ) -> dict[str, Any]:
  """What the prepared files depend on; a manifest with another key is stale."""
  if options.tokenizer:
    model = pathlib.Path(options.tokenizer).expanduser().resolve()
    if not model.is_file():
      raise ValueError(f"tokens.tokenizer: no file {model}")
    tokenizer = {"model": str(model), "sha256": _sha256(model)}
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
                tokenizer_path: pathlib.Path) -> bool:
  if manifest is None or any(manifest.get(name) != value for name, value in key.items()):
    return False
  tokens = folder / TOKENS
  try:
    expected_size = manifest["num_tokens"] * np.dtype(manifest["dtype"]).itemsize
    return (tokens.stat().st_size == expected_size
            and _sha256(tokenizer_path) == manifest["tokenizer_sha256"])
  except (OSError, KeyError, TypeError):
    return False


def load_or_build(options: ml_collections.ConfigDict, folder: str | os.PathLike,
                  *, progress: bool = False, allow_build: bool = True) -> TokenCorpus:
  """The prepared corpus in `folder`, rebuilt first if its manifest does not match."""
  if options.documents not in DOCUMENT_FORMATS:
    raise ValueError(f"tokens.documents must be one of {DOCUMENT_FORMATS}, "
                     f"got {options.documents!r}")
  folder = pathlib.Path(folder).expanduser()
  paths = chars.resolve_paths(options.path, "tokens.path")
  key = _build_key(options, paths)
  tokenizer_path = (pathlib.Path(key["tokenizer"]["model"]) if options.tokenizer
                    else folder / TOKENIZER)
  manifest = _manifest_or_none(folder)
  rebuilt = not _is_current(manifest, key, folder, tokenizer_path)
  if rebuilt:
    if not allow_build:
      raise FileNotFoundError(
          f"{folder} holds no tokenised corpus matching the config; run "
          "`python -m md4.data.prepare --config=...` once before a multi-process job")
    manifest = _build(options, paths, key, folder, tokenizer_path, progress)
  if manifest["num_tokens"] == 0:
    raise ValueError(f"tokens.path={options.path!r} holds no documents")
  dtype = np.dtype(manifest["dtype"])
  tokens = np.memmap(folder / TOKENS, dtype=dtype, mode="r", shape=(manifest["num_tokens"],))
  return TokenCorpus(tokens=tokens, tokenizer_path=tokenizer_path,
                     vocab_size=manifest["vocab_size"], eod_id=manifest["eod_id"],
                     manifest=manifest, rebuilt=rebuilt)


def _build(options: ml_collections.ConfigDict, paths: Sequence[pathlib.Path],
           key: dict[str, Any], folder: pathlib.Path, tokenizer_path: pathlib.Path,
           progress: bool) -> dict[str, Any]:
  logging.info("Preparing the token corpus in %s", folder)
  folder.mkdir(parents=True, exist_ok=True)
  # The manifest goes first and comes back last: a half-built folder never matches.
  (folder / MANIFEST).unlink(missing_ok=True)
  if not options.tokenizer:
    train_tokenizer(paths, options.documents, tokenizer_path,
                    vocab_size=options.vocab_size, tokenizer_type=options.tokenizer_type,
                    max_sentences=options.max_training_sentences, progress=progress)
  processor = _load_processor(tokenizer_path)
  vocab_size, eod_id = vocabulary(processor)
  dtype = token_dtype(vocab_size)
  part = folder / (TOKENS + ".part")
  num_tokens, num_documents = tokenise(paths, options.documents, processor, eod_id, dtype,
                                       part, progress)
  os.replace(part, folder / TOKENS)
  manifest = {**key, "tokenizer_sha256": _sha256(tokenizer_path), "vocab_size": vocab_size,
              "eod_id": eod_id, "dtype": dtype.name, "num_tokens": num_tokens,
              "num_documents": num_documents}
  _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
  return manifest


def decoder(tokenizer_path: pathlib.Path, eod_id: int):
  """Maps ids [...] to text, one line per document end."""
  processor = _load_processor(tokenizer_path)
  pieces = processor.get_piece_size()

  def decode(ids: np.ndarray) -> str:
    ids = np.asarray(ids).reshape(-1).tolist()
    documents, current = [], []
    for token in ids:
      if token == eod_id:
        documents.append(current)
        current = []
      elif 0 <= token < pieces:
        current.append(token)
      else:
        raise ValueError(f"id {token} is outside the vocabulary [0, {pieces})")
    documents.append(current)
    return "\n".join(processor.decode(document) for document in documents)

  return decode


def folder(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where the prepared corpus lives: <config.data_dir>/tokens/<config.tokens.name>."""
  return pathlib.Path(config.data_dir).expanduser() / "tokens" / config.tokens.name


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


def _read_other_text(path: str, corpus: TokenCorpus, documents: str) -> np.ndarray:
  """ids int32 [N] of a text file (tokenised like the corpus) or of a prepared corpus folder.

  A folder must have been tokenised with the training corpus's tokenizer (same SHA-256).
  """
  location = pathlib.Path(path).expanduser()
  if not location.is_dir():
    processor = _load_processor(corpus.tokenizer_path)
    stream = []
    for document, _ in iter_documents(chars.resolve_paths(path, "text file"), documents):
      stream.extend(processor.encode(document, out_type=int))
      stream.append(corpus.eod_id)
    return np.asarray(stream, np.int32)
  manifest = read_manifest(location, path)
  if manifest["tokenizer_sha256"] != corpus.manifest["tokenizer_sha256"]:
    raise ValueError(
        f"{path} was tokenised with a different tokenizer (SHA-256 "
        f"{manifest['tokenizer_sha256'][:12]}...) than the model's (SHA-256 "
        f"{corpus.manifest['tokenizer_sha256'][:12]}...): prepare it with "
        f"tokens.tokenizer={str(corpus.tokenizer_path)!r}")
  if manifest["vocab_size"] != corpus.vocab_size:
    raise ValueError(f"{path} has vocab_size {manifest['vocab_size']}, the model "
                     f"{corpus.vocab_size}")
  return np.memmap(location / TOKENS, dtype=np.dtype(manifest["dtype"]), mode="r",
                   shape=(manifest["num_tokens"],))


def create(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """Sequences of config.seq_len ids from the prepared corpus in `folder(config)`."""
  options = config.tokens
  corpus = load_or_build(options, folder(config), allow_build=jax.process_count() == 1)
  length = config.seq_len
  if length < 1:
    raise ValueError(f"seq_len must be >= 1, got {length}")
  num_train, num_validation = pipeline.split_chunks(
      len(corpus.tokens), length, options.validation_fraction, "tokens.validation_fraction")
  train = pipeline.ChunkSource(corpus.tokens, length, 0, num_train)
  validation = pipeline.ChunkSource(corpus.tokens, length, num_train * length, num_validation)
  processor = _load_processor(corpus.tokenizer_path)
  return data_lib.Dataset(
      train=pipeline.train_iterator(train, config.batch_size, config.seed),
      eval_batches=pipeline.eval_iterator_fn(validation, config.batch_size),
      vocab_size=corpus.vocab_size,
      example_shape=(length,),
      decode=decoder(corpus.tokenizer_path, corpus.eod_id),
      encode=lambda text: np.asarray(processor.encode(text, out_type=int), np.int32),
      read_text=lambda path: _read_other_text(path, corpus, options.documents),
      word_pieces=True,
  )


def prepare(config: ml_collections.ConfigDict, progress: bool) -> dict[str, Any]:
  """Trains the tokenizer (unless given) and tokenises the corpus, unless already current."""
  corpus = load_or_build(config.tokens, folder(config), progress=progress)
  return {"folder": str(folder(config)), "rebuilt": corpus.rebuilt,
          "vocab_size": corpus.vocab_size, "eod_id": corpus.eod_id,
          "tokens": corpus.manifest["num_tokens"],
          "documents": corpus.manifest["num_documents"]}


SOURCE = data_lib.register(data_lib.Source("tokens", OPTIONS, create, prepare))
