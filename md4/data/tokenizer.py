"""Tokenizers of token corpora: SentencePiece, Hugging Face `tokenizers` files, tiktoken.

`config.tokens.tokenizer` picks one (`load`):

  PATH.model        a SentencePiece model (`train_sentencepiece` trains one on
                    the corpus when the option is empty);
  PATH.json         a Hugging Face `tokenizers` file, e.g. GPT-2's tokenizer.json;
  tiktoken:NAME     tiktoken's encoding NAME, e.g. tiktoken:gpt2. tiktoken reads
                    its BPE files from its cache ($TIKTOKEN_CACHE_DIR, else
                    <tmp>/data-gym-cache) and downloads them there when absent;
                    with tokens.tiktoken_dir set, gpt2's files are read from that
                    folder instead, offline: encoder.json and vocab.bpe as OpenAI
                    released them, or the same two as vocab.json and merges.txt
                    (Hugging Face's gpt2 repository).

The end of a document is the tokenizer's own end token where it has one
(GPT-2's <|endoftext|>, id 50256; SentencePiece's </s>), else an extra id equal
to the tokenizer's size. Text is encoded as the GPT-2 references do
(transformers' GPT2Tokenizer): special tokens written in the text are
recognised, no other special token is added.

A SentencePiece <unk> decodes to UNKNOWN_MARK, U+FFFD (Unicode's replacement
character, which byte-fallback pieces that form no character also decode to),
not SentencePiece's " ⁇ ". A model trained with byte fallback has no unknown
characters: they are encoded as bytes and decode to the text's own bytes.
"""

import hashlib
import io
import json
import logging
import os
import pathlib
from typing import Iterator, Protocol, Sequence

from google.protobuf import message

from md4.data import document_files
from md4.runtime import progress as progress_lib

TIKTOKEN_PREFIX = "tiktoken:"
UNKNOWN_MARK = "\ufffd"
END_TOKENS = ("<|endoftext|>", "</s>")
TOKENIZER_TYPES = ("bpe", "unigram")  # SentencePiece's models that md4 trains.
_UNK_ID, _EOS_ID = 0, 1  # Those of the SentencePiece models md4 trains.
_MAX_SENTENCE_BYTES = 1 << 14
# gpt2's local files: (OpenAI's names, Hugging Face's names) for (ranks, merges).
_GPT2_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class Tokenizer(Protocol):
  """What md4 needs of a tokenizer.

  Attributes:
    kind: "sentencepiece", "huggingface" or "tiktoken".
    identity: what it is, for the corpus manifest: kind and path or name.
    vocab_size: number of ids, the end-of-document id included.
    eod_id: the end-of-document id.
    sha256: a digest of its vocabulary (of the file for file-based ones); a
      corpus tokenised with another digest is stale.
  """

  kind: str
  identity: dict[str, str]
  vocab_size: int
  eod_id: int
  sha256: str

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text, no end-of-document id."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids in [0, vocab_size), the end-of-document id excluded."""


def file_sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    while chunk := file.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


class SentencePiece:
  """A SentencePiece .model file."""

  kind = "sentencepiece"

  def __init__(self, path: pathlib.Path):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    try:
      model = sentencepiece_model_pb2.ModelProto.FromString(pathlib.Path(path).read_bytes())
      model.trainer_spec.unk_surface = UNKNOWN_MARK
      self._processor = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    except (OSError, RuntimeError, message.DecodeError) as error:
      raise ValueError(f"tokens.tokenizer: cannot load a SentencePiece model from {path} "
                       f"({error})") from error
    pieces = self._processor.get_piece_size()
    if self._processor.eos_id() >= 0:
      self.vocab_size, self.eod_id = pieces, self._processor.eos_id()
    else:
      self.vocab_size, self.eod_id = pieces + 1, pieces
    self.identity = {"kind": self.kind, "model": str(path)}
    self.sha256 = file_sha256(path)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode(list(ids))


class HuggingFace:
  """A Hugging Face `tokenizers` tokenizer.json."""

  kind = "huggingface"

  def __init__(self, path: pathlib.Path):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ValueError(f"tokens.tokenizer={path} needs Hugging Face's tokenizers package: "
                       "pip install 'md4[hf]'") from error
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # pylint: disable=broad-exception-caught
      # tokenizers raises a bare Exception for a file it cannot parse.
      raise ValueError(f"tokens.tokenizer: {path} is not a Hugging Face tokenizers file "
                       f"({error})") from error
    size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    end = next((self._tokenizer.token_to_id(token) for token in END_TOKENS
                if self._tokenizer.token_to_id(token) is not None), None)
    self.vocab_size, self.eod_id = (size, end) if end is not None else (size + 1, size)
    self.identity = {"kind": self.kind, "model": str(path)}
    self.sha256 = file_sha256(path)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def _gpt2_files(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(ranks json, merges) of GPT-2's BPE in folder, under either release's names."""
  for ranks, merges in _GPT2_FILES:
    if (folder / ranks).is_file() and (folder / merges).is_file():
      return folder / ranks, folder / merges
  names = " or ".join(" + ".join(pair) for pair in _GPT2_FILES)
  raise ValueError(f"tokens.tiktoken_dir={str(folder)!r} holds neither {names} "
                   "(GPT-2's BPE files)")


def _local_gpt2(folder: pathlib.Path):
  """tiktoken's gpt2 encoding from GPT-2's BPE files in folder."""
  import tiktoken  # pylint: disable=g-import-not-at-top
  from tiktoken import load  # pylint: disable=g-import-not-at-top
  from tiktoken_ext import openai_public  # pylint: disable=g-import-not-at-top
  ranks_file, merges_file = _gpt2_files(folder)
  try:
    # The hashes of the files themselves: tiktoken's cache copy of a changed file is not reused.
    ranks = load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(merges_file), encoder_json_file=str(ranks_file),
        vocab_bpe_hash=file_sha256(merges_file), encoder_json_hash=file_sha256(ranks_file))
  except (AssertionError, KeyError, ValueError) as error:
    raise ValueError(f"tokens.tiktoken_dir: {ranks_file.name} and {merges_file.name} in "
                     f"{folder} are not one GPT-2-format BPE ({error!r})") from error
  return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str,
                           mergeable_ranks=ranks,
                           special_tokens={openai_public.ENDOFTEXT: len(ranks)})


class TikToken:
  """A tiktoken encoding."""

  kind = "tiktoken"

  def __init__(self, name: str, folder: str = ""):
    import tiktoken  # pylint: disable=g-import-not-at-top
    if folder:
      if name != "gpt2":
        raise ValueError(f"tokens.tiktoken_dir reads GPT-2's BPE files only; "
                         f"tokens.tokenizer={TIKTOKEN_PREFIX}{name} is read from tiktoken's "
                         "cache: leave tokens.tiktoken_dir empty")
      self._encoding = _local_gpt2(pathlib.Path(folder).expanduser())
    else:
      try:
        self._encoding = tiktoken.get_encoding(name)
      except ValueError as error:
        raise ValueError(f"tokens.tokenizer={TIKTOKEN_PREFIX}{name}: {error}") from error
      except OSError as error:
        raise ValueError(
            f"tiktoken could not read or download the files of {name!r} ({error}): put "
            "them in its cache ($TIKTOKEN_CACHE_DIR) or, for gpt2, set tokens.tiktoken_dir "
            "to a folder holding GPT-2's encoder.json and vocab.bpe") from error
    self.vocab_size = self._encoding.n_vocab
    self.eod_id = self._encoding.eot_token
    self.identity = {"kind": self.kind, "name": name}
    self.sha256 = self._digest()

  def _digest(self) -> str:
    """SHA-256 of every id's bytes and the special tokens: the same wherever the files came from."""
    digest = hashlib.sha256()
    for token in range(self._encoding.n_vocab):
      try:
        piece = self._encoding.decode_single_token_bytes(token)
      except KeyError:
        continue  # An id between the ranks and the special tokens that nothing encodes to.
      digest.update(f"{token} {len(piece)} ".encode() + piece)
    special = {token: self._encoding.encode_single_token(token)
               for token in self._encoding.special_tokens_set}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._encoding.encode_batch(list(texts), allowed_special="all",
                                       num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self._encoding.decode(list(ids), errors="replace")


def load(spec: str, tiktoken_dir: str = "") -> Tokenizer:
  """The tokenizer `spec` names (module docstring); ValueError saying what is wrong."""
  if spec.startswith(TIKTOKEN_PREFIX):
    return TikToken(spec[len(TIKTOKEN_PREFIX):], tiktoken_dir)
  path = pathlib.Path(spec).expanduser().resolve()
  if not path.is_file():
    raise ValueError(f"tokens.tokenizer: no file {path}")
  if path.suffix == ".model":
    return SentencePiece(path)
  if path.suffix == ".json":
    return HuggingFace(path)
  raise ValueError(f"tokens.tokenizer={spec!r}: give a SentencePiece .model, a Hugging Face "
                   f"tokenizer .json, or {TIKTOKEN_PREFIX}NAME (e.g. {TIKTOKEN_PREFIX}gpt2)")


def train_sentencepiece(paths: Sequence[pathlib.Path], documents: str, *, vocab_size: int,
                        tokenizer_type: str, max_sentences: int, progress: bool = False) -> bytes:
  """A SentencePiece model (its file's bytes) trained on the lines of the corpus's documents.

  Ids 0 and 1 are <unk> and </s>; lines SentencePiece would drop (over
  _MAX_SENTENCE_BYTES) are left out and counted in a warning.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if tokenizer_type not in TOKENIZER_TYPES:
    raise ValueError(f"tokens.tokenizer_type must be one of {TOKENIZER_TYPES}, "
                     f"got {tokenizer_type!r}")
  if vocab_size < 3:
    raise ValueError(f"tokens.vocab_size must be >= 3, got {vocab_size}")
  if max_sentences < 1:
    raise ValueError(f"tokens.max_training_sentences must be >= 1, got {max_sentences}")
  total = sum(path.stat().st_size for path in paths)
  counts = {"kept": 0, "too_long": 0}
  reading_errors = []  # Some SentencePiece releases end the input at an error, not raising it.

  def sentences() -> Iterator[str]:
    with progress_lib.bar(total, "training tokenizer", "B", enabled=progress,
                          unit_scale=True) as bar:
      try:
        for document, consumed in document_files.iter_documents(paths, documents):
          bar.update(consumed)
          for line in document.split("\n"):
            if not line.strip():
              continue
            if len(line.encode("utf-8")) > _MAX_SENTENCE_BYTES:  # SentencePiece would drop it.
              counts["too_long"] += 1
              continue
            counts["kept"] += 1
            yield line
      except Exception as error:  # pylint: disable=broad-except
        reading_errors.append(error)
        raise

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
    if reading_errors:
      raise reading_errors[0]  # pylint: disable=raise-missing-from
    if not counts["kept"]:
      raise ValueError(
          f"the corpus ({len(paths)} file(s), tokens.path) has no line to train a tokenizer on: "
          f"{counts['too_long']} line(s) longer than {_MAX_SENTENCE_BYTES} bytes, the rest "
          "empty; give a corpus with text, split long lines, or check tokens.documents "
          f"(now {documents!r})") from error
    raise ValueError(f"SentencePiece could not train a {tokenizer_type} model with "
                     f"tokens.vocab_size={vocab_size} on {len(paths)} file(s): {error}") from error
  if counts["too_long"]:
    logging.warning("Tokenizer training left out %d line(s) longer than %d bytes (of %d)",
                    counts["too_long"], _MAX_SENTENCE_BYTES, counts["too_long"] + counts["kept"])
  return model.getvalue()
