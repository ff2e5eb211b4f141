"""Documents in the files corpora come in: text, jsonl, Arrow tables (parquet, Arrow IPC), tar archives.

`iter_documents` reads every format of config.tokens.documents. Read with
pyarrow and the standard library; the `datasets` library is not needed.

  parquet   a Hugging Face dataset's parquet shards (e.g. OpenWebText's
            plain_text/train/*.parquet): one document per row of a string column.
  arrow     the Arrow files `datasets` keeps in its cache or writes with
            save_to_disk (IPC stream or file format): the same, one per row.
  archive   OpenWebText's archives: every .txt member is a document, and a
            member that is itself an archive (the .xz files inside
            urlsf_subset*.tar or openwebtext.tar.xz) is read in turn; members in
            archive order, as the Hugging Face openwebtext builder reads them.
"""

import json
import pathlib
import re
import tarfile
from typing import Iterator, Sequence

from md4.data import chars

DOCUMENT_FORMATS = ("line", "blank_line", "file", "jsonl", "parquet", "arrow", "openwebtext")
_TABLE_BATCH_ROWS = 1024
_NESTED_ARCHIVES = (".xz", ".tar", ".gz", ".bz2", ".tgz")
_BLANK_RUNS = re.compile("\n\n\n+")


def _table_column(schema, column: str, path: pathlib.Path) -> None:
  if column not in schema.names:
    raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")


def _table_batches(path: pathlib.Path, column: str) -> Iterator[tuple[list, float]]:
  """(a batch of a column's values, share of the file read with it), a parquet or Arrow file's."""
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"{path}: parquet and Arrow files need pyarrow, which md4 installs only with its arrow "
        f"extra: pip install 'md4[arrow]' (or -e '.[arrow]' in a checkout) ({error})") from error
  if path.suffix == ".parquet":
    try:
      table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
      raise ValueError(f"{path}: not a parquet file ({error})") from error
    _table_column(table.schema_arrow, column, path)
    rows, total = 0, max(table.metadata.num_rows, 1)
    for batch in table.iter_batches(batch_size=_TABLE_BATCH_ROWS, columns=[column]):
      rows += batch.num_rows
      yield batch.column(0).to_pylist(), rows / total
    return
  with pa.OSFile(str(path)) as source:
    size = max(path.stat().st_size, 1)
    try:
      stream = pa.ipc.open_stream(source)
    except pa.ArrowException:
      stream = None
    if stream is not None:
      _table_column(stream.schema, column, path)
      for batch in stream:
        yield batch.column(column).to_pylist(), source.tell() / size
      return
  try:
    reader = pa.ipc.open_file(path)
  except (OSError, pa.ArrowException) as error:
    raise ValueError(f"{path}: not an Arrow IPC stream or file ({error})") from error
  _table_column(reader.schema, column, path)
  for index in range(reader.num_record_batches):
    yield (reader.get_batch(index).column(column).to_pylist(),
           (index + 1) / reader.num_record_batches)


def iter_table(path: pathlib.Path, column: str = "text") -> Iterator[tuple[str, int]]:
  """(row's text, bytes of the file read since the previous row), a parquet or Arrow file's rows."""
  size = path.stat().st_size
  read = 0
  for texts, share in _table_batches(path, column):
    for text in texts:
      if not isinstance(text, str):
        raise ValueError(f"{path}: column {column!r} holds {type(text).__name__}, not text")
      position = round(size * share)
      yield text, position - read
      read = position


def _iter_tar(archive: tarfile.TarFile, where: str) -> Iterator[str]:
  for member in archive:
    name = pathlib.PurePosixPath(member.name).name
    if not member.isfile() or name.startswith((".", "__")):
      continue
    content = archive.extractfile(member)
    if name.endswith(".txt"):
      raw = content.read()
      try:
        yield raw.decode("utf-8")
      except UnicodeDecodeError as error:
        raise ValueError(f"{where}/{member.name}: not UTF-8 ({error.reason})") from error
    elif name.endswith(_NESTED_ARCHIVES):
      with tarfile.open(fileobj=content, mode="r|*") as inner:
        yield from _iter_tar(inner, f"{where}/{member.name}")


def iter_archive(path: pathlib.Path) -> Iterator[tuple[str, int]]:
  """(document, bytes of the file read since the previous one) of an OpenWebText archive.

  A document is normalised as the Hugging Face openwebtext builder does: runs
  of three or more newlines become two, and the text is stripped.
  """
  with open(path, "rb") as raw:
    try:
      archive = tarfile.open(fileobj=raw, mode="r|*")
    except tarfile.TarError as error:
      raise ValueError(
          f"{path}: not a tar archive ({error}), which tokens.documents='openwebtext' reads; "
          "for another corpus set tokens.documents to its format (docs/data.md lists them)"
      ) from error
    read = 0
    with archive:
      try:
        for text in _iter_tar(archive, str(path)):
          position = raw.tell()
          yield _BLANK_RUNS.sub("\n\n", text).strip(), position - read
          read = position
      except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{path}: a damaged or truncated archive ({error})") from error


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
    if documents in ("parquet", "arrow", "openwebtext"):
      rows = (iter_archive(path) if documents == "openwebtext"
              else iter_table(path))
      consumed = 0
      for text, read in rows:
        consumed += read
        if text.strip():
          yield text, consumed
          consumed = 0
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
