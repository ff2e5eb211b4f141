"""The zero-shot sets of the MD4 paper's table: readers, detokenisers and packing.

LAMBADA, WikiText2, PTB, WikiText103 and One Billion Words, read from local
copies (docs/data.md says which files, from where) into the rows of the
Hugging Face datasets that SEDD and MDLM load:

  lambada      lambada_test.jsonl (OpenAI's): a row per line, its "text".
  wikitext2,   wiki.valid.raw / wiki.test.raw of wikitext-*-raw-v1.zip: a row
  wikitext103  per line, newline kept; a blank line is the empty row.
  ptb          ptb.valid.txt / ptb.test.txt (Mikolov's): a row per line, stripped.
  lm1b         news.en.heldout-* of the One Billion Words archive (a file, a
               glob, or the heldout-monolingual.tokenized.shuffled folder): a
               row per line, stripped.

Any set may also be given as a Hugging Face parquet or Arrow file of its
rows (column "text"; "sentence" for ptb).

Each row goes through its set's detokeniser (SEDD's, which MDLM copies: the
rules are reproduced exactly, oddities included, so that numbers compare),
is tokenised with the model's tokenizer and followed by the end-of-document
id; the rows' ids are concatenated and cut into non-overlapping sequences of
the model's length, the remainder dropped. That is SEDD's packing (and
md4's training packing, after the MD4 reference); MDLM's instead frames
every L - 2 ids with <BOS> ... <EOS>. SEDD concatenates within batches of
1000 rows; md4 concatenates the whole set, so a few more of its tokens are
scored.
"""

import dataclasses
import pathlib
import re
from typing import Callable, Iterator

import numpy as np

from md4.data import chars
from md4.data import document_files
from md4.data import tokenizer as tokenizer_lib
from md4.data import tokens

_TABLES = (".parquet", ".arrow")
_LM1B_FILES = "news.en.heldout-*"

# (pattern, replacement), applied in order: a str is replaced literally, a regex by re.sub.
_WIKITEXT_RULES = (
    ("s '", "s'"),
    # As in SEDD: the slashes are literal, so this only rewrites "/' N/"; kept for comparability.
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "), (" 's", "'s"),
)
_PTB_RULES = (
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"),
    # Ten times, as in SEDD: each pass rewrites every other " N " of a run "N N N".
    *((" N ", " 1 "),) * 10,
    ("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?"),
)
_LM1B_RULES = (
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" \'(\w+)"), r"'\1"),
    (re.compile(r" (\w+) \. "), r" \1. "),
    (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"),
    (" ! ", "! "), (re.compile(r" \!$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r"\" ([^\"]+) \""), r'"\1"'),
    (re.compile(r"\' ([^\']+) \'"), r"'\1'"),
    (re.compile(r"\( ([^\(\)]+) \)"), r"(\1)"),
    (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\N{POUND SIGN} ", "\N{POUND SIGN}"),
)


def _apply(rules, text: str) -> str:
  for pattern, replacement in rules:
    if isinstance(pattern, str):
      text = text.replace(pattern, replacement)
    else:
      text = pattern.sub(replacement, text)
  return text


def wikitext_detokenizer(text: str) -> str:
  """SEDD's wt_detokenizer: undoes WikiText's spaced punctuation and @-@ separators."""
  return _apply(_WIKITEXT_RULES, text)


def ptb_detokenizer(text: str) -> str:
  """SEDD's ptb_detokenizer: contractions, N -> 1, <unk> -> ?."""
  return _apply(_PTB_RULES, text)


def lm1b_detokenizer(text: str) -> str:
  """SEDD's lm1b_detokenizer: undoes One Billion Words' spaced punctuation."""
  return _apply(_LM1B_RULES, text)


def lambada_detokenizer(text: str) -> str:
  """SEDD's lambada_detokenizer: straight double quotes, stripped, one leading newline."""
  for curly in ("\N{LEFT DOUBLE QUOTATION MARK}", "\N{RIGHT DOUBLE QUOTATION MARK}"):
    text = text.replace(curly, '"')
  return "\n" + text.strip()


def _text_lines(path: pathlib.Path) -> Iterator[str]:
  """Lines with their newline, as Python's text mode reads them (universal newlines)."""
  try:
    with open(path, encoding="utf-8") as file:
      yield from file
  except UnicodeDecodeError as error:
    raise ValueError(f"{path}: not UTF-8 ({error.reason})") from error


def _lambada_rows(path: pathlib.Path) -> Iterator[str]:
  for text, _ in document_files.iter_documents([path], "jsonl"):
    yield text


def _wikitext_rows(path: pathlib.Path) -> Iterator[str]:
  for line in _text_lines(path):
    yield line if line.strip() else ""


def _stripped_rows(path: pathlib.Path) -> Iterator[str]:
  for line in _text_lines(path):
    yield line.strip()


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
  """One set of the table.

  Attributes:
    title: its name in the table.
    read: a local file in the set's own format -> its rows.
    detokenize: SEDD's detokeniser for the set.
    column: the column of its rows in a parquet or Arrow file.
  """

  title: str
  read: Callable[[pathlib.Path], Iterator[str]]
  detokenize: Callable[[str], str]
  column: str = "text"


SETS = {
    "lambada": ZeroShotSet("LAMBADA", _lambada_rows, lambada_detokenizer),
    "wikitext2": ZeroShotSet("WikiText2", _wikitext_rows, wikitext_detokenizer),
    "ptb": ZeroShotSet("PTB", _stripped_rows, ptb_detokenizer, column="sentence"),
    "wikitext103": ZeroShotSet("WikiText103", _wikitext_rows, wikitext_detokenizer),
    "lm1b": ZeroShotSet("One Billion Words", _stripped_rows, lm1b_detokenizer),
}


def parse(spec: str) -> list[tuple[str, str]]:
  """"NAME:PATH,NAME:PATH,..." -> [(name, path)], the names checked against SETS."""
  pairs = []
  for item in (part.strip() for part in spec.split(",")):
    name, separator, path = item.partition(":")
    if not separator or not path:
      raise ValueError(f"zero_shot: {item!r} is not NAME:PATH (e.g. "
                       "lambada:/data/lambada_test.jsonl)")
    if name not in SETS:
      raise ValueError(f"zero_shot: unknown set {name!r}; valid: {', '.join(SETS)}")
    pairs.append((name, path))
  if len({name for name, _ in pairs}) < len(pairs):
    raise ValueError(f"zero_shot: a set is named twice in {spec!r}")
  return pairs


def _files(name: str, path: str) -> list[pathlib.Path]:
  location = pathlib.Path(path).expanduser()
  if name == "lm1b" and location.is_dir():
    files = sorted(location.glob(_LM1B_FILES))
    if not files:
      raise ValueError(f"zero_shot: {location} holds no {_LM1B_FILES} file")
    return files
  return chars.resolve_paths(path, f"zero_shot {name}")


def rows(name: str, path: str) -> Iterator[str]:
  """The detokenised rows of set `name` from the file(s) at path."""
  zero_shot_set = SETS[name]
  for file in _files(name, path):
    if file.suffix in _TABLES:
      texts = (text for text, _ in document_files.iter_table(file, zero_shot_set.column))
    else:
      texts = zero_shot_set.read(file)
    for text in texts:
      yield zero_shot_set.detokenize(text)


def token_ids(name: str, path: str, tokenizer: tokenizer_lib.Tokenizer) -> np.ndarray:
  """The set's token stream int32 [N]: every row's ids, then the end-of-document id."""
  return tokens.encode_documents(tokenizer, list(rows(name, path)))


def sequences(ids: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping sequences int32 [N // length, length] of ids [N], the remainder dropped."""
  count = len(ids) // length
  return np.asarray(ids[:count * length], np.int32).reshape(count, length)
