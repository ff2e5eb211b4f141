"""Workdir files on a local disk or an object store (gs://), written so that both keep them whole.

An object store replaces an object in one upload and cannot append to it or
rename a folder atomically. So md4 writes each file whole (`write_whole`), or
through `AppendFile`, which appends in place on a disk and, on an object
store, keeps the file's bytes and uploads them whole when flushed.

gs:// goes through gcsfs (fsspec, for etils.epath) and tensorstore (Orbax's
arrays). `use_emulator_if_set` points both at the server named by
STORAGE_EMULATOR_HOST, the variable Google's client libraries read.
"""

import os
import pathlib
import time

from etils import epath

from md4.runtime import outage

OBJECT_STORE_SCHEMES = ("gs://", "s3://")
EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
UPLOAD_SECONDS = 30.0  # How stale an object store's copy of an AppendFile may get.


def use_emulator_if_set() -> None:
  """With STORAGE_EMULATOR_HOST set, sends every gs:// request there and asks for no credentials.

  gcsfs reads the variable itself; tensorstore reads TENSORSTORE_GCS_HTTP_URL
  and, in place of a credential lookup, GOOGLE_AUTH_TOKEN_FOR_TESTING. Call
  before the first gs:// access.
  """
  host = os.environ.get(EMULATOR_VARIABLE)
  if not host:
    return
  url = host if host.startswith(("http://", "https://")) else f"http://{host}"
  os.environ[EMULATOR_VARIABLE] = url  # gcsfs reads it too, and needs the scheme.
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
  os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  # gcsfs probes each bucket's type over gRPC, which emulators do not serve.
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"


def is_object_store(path: epath.PathLike) -> bool:
  return os.fspath(path).startswith(OBJECT_STORE_SCHEMES)


def check_writable(path: epath.Path, what: str, instead: str) -> None:
  """Raises ValueError, naming what and the way out (instead), when the local folder path
  (or, if it does not exist yet, the folder it would be made in) cannot be written."""
  if is_object_store(path):
    return  # Known at the first write: a store says so only then.
  existing = pathlib.Path(path)
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{what} {path} cannot be written ({existing} is read-only for this user): "
                     f"{instead}")


def workdir_path(workdir: epath.PathLike) -> epath.Path:
  """The workdir, absolute (Orbax takes only absolute paths); an object store's as given.

  Raises ValueError, before anything is written, for an empty one or a file.
  """
  text = os.fspath(workdir).strip()
  if not text:
    raise ValueError("--workdir is empty: name a directory for the run's checkpoints, metrics "
                     "and samples")
  if is_object_store(text):
    return epath.Path(text)
  path = epath.Path(os.path.abspath(os.path.expanduser(text)))
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir={text} is a file, not a directory: name a new directory or a "
                     "run's workdir")
  check_writable(path, "--workdir", "make it writable, or name another --workdir")
  return path


def _fsspec(path: epath.Path):
  """(fsspec filesystem, path in it) of a local or object-store path."""
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.core.url_to_fs(os.fspath(path))


def write_whole(path: epath.Path, data: bytes | str) -> None:
  """Replaces path's content at once: a readers sees the old file or the new one, never a part."""
  data = data.encode() if isinstance(data, str) else data
  if is_object_store(path):
    path.write_bytes(data)  # One upload: the object is replaced whole.
    return
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  temporary.write_bytes(data)
  os.replace(temporary, path)


def create_exclusive(path: epath.Path, data: str) -> bool:
  """Creates path holding data if no such file exists; False if one does.

  Local disks create with O_EXCL; gs:// uploads on the condition that no
  object exists. A store that ignores the condition (some emulators do)
  still cannot hand the file to two writers one after the other: it is
  looked for first and read back after.
  """
  if path.exists():
    return False
  fs, fs_path = _fsspec(path)
  try:
    fs.pipe_file(fs_path, data.encode(), mode="create")
  except FileExistsError:
    return False
  return path.read_text() == data


def move_aside(source: epath.Path, destination: epath.Path) -> None:
  """Moves the folder source to destination (which must not exist), object by object on a store."""
  destination.parent.mkdir(parents=True, exist_ok=True)
  if destination.exists():
    raise FileExistsError(f"{destination} exists; not moving {source} onto it")
  if is_object_store(source):
    fs, fs_path = _fsspec(source)
    fs.mv(fs_path, _fsspec(destination)[1], recursive=True)
  else:
    os.rename(source, destination)


class AppendFile:
  """A file that only grows: appended in place on a disk, uploaded whole on an object store.

  On an object store the bytes are kept here and uploaded by `flush`, which
  `write` calls when the last upload is UPLOAD_SECONDS old; `close` uploads
  what is left. An upload the store does not answer is reported to
  `md4.runtime.outage`, and the next one carries its bytes.
  """

  def __init__(self, path: epath.Path, content: bytes):
    """Starts the file at path with content (what it held before is replaced)."""
    self.path = path
    self._file = None
    if is_object_store(path):
      self._content = bytearray(content)
      self.flush()
    else:
      write_whole(path, content)
      self._file = path.open("ab")

  def write(self, data: bytes) -> None:
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    self._content += data
    if time.monotonic() - self._uploaded_at >= UPLOAD_SECONDS:
      self.flush()

  def flush(self) -> None:
    """Makes everything written so far visible in the store (if it answers: else at the next)."""
    if self._file is not None:
      self._file.flush()
      return
    started = time.monotonic()
    try:
      self.path.write_bytes(bytes(self._content))
    except Exception as error:  # pylint: disable=broad-except
      if not outage.tolerated(f"uploading {self.path.name}", error, started):
        raise
    else:
      outage.answered()
    self._uploaded_at = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
