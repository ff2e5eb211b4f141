"""What md4's commands do before JAX starts: the CPU allocator, and finding a config file.

Host allocator. On a CPU backend XLA allocates each step's buffers (the
quick start: about 100 MB) with malloc from its worker threads. glibc serves
such a block from a fresh mmap, or from a per-thread arena that it shrinks
again on free, so every step faults the pages back in: measured on a 2-core
Xeon, 21,000 page faults and 30 ms of system time per quick-start step
against 90 ms of user time. `keep_host_buffers` makes glibc keep freed memory
for reuse instead (one arena, no mmap for large blocks, no trimming), which
brings that to about 400 faults and 2 ms. It is done only where JAX can find
no accelerator, since it also keeps a host's memory at its high-water mark.

Config files. `--config=configs/NAME.py` names a file of the repository;
outside a checkout the same file is read from the installed package
(md4/configs), so the README's commands work from any directory.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pathlib
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Freed memory stays with the process unless this much lies free at the heap's top.
_TRIM_THRESHOLD_BYTES = 1 << 30

PACKAGED_CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
CONFIG_PREFIX = "configs/"


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return set(platforms.split(",")) == {"cpu"}
  return (importlib.util.find_spec("libtpu") is None
          and importlib.util.find_spec("jax_plugins") is None
          and not importlib.metadata.entry_points(group="jax_plugins"))


def keep_host_buffers() -> bool:
  """Sets glibc's malloc to reuse freed memory (module docstring); True if it did.

  Call before JAX's CPU client starts (its threads pick their arenas on their
  first allocation). Does nothing on an accelerator host, without glibc, or
  when MALLOC_ARENA_MAX or GLIBC_TUNABLES show the user tuned malloc already.
  """
  if not cpu_only() or "MALLOC_ARENA_MAX" in os.environ or "GLIBC_TUNABLES" in os.environ:
    return False
  name = ctypes.util.find_library("c")
  if name is None or not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # Not glibc (musl has no mallopt).
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)))


def find_config(argv: list[str], flag: str = "config") -> list[str]:
  """argv with `--config=configs/NAME.py` pointed at the packaged copy when no such file is here.

  Both `--config=PATH` and `--config PATH` are read; a `:args` suffix is kept.
  """
  argv = list(argv)
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      argv[index] = f"--{flag}=" + _packaged_if_missing(arg.split("=", 1)[1])
    elif arg == f"--{flag}" and index + 1 < len(argv):
      argv[index + 1] = _packaged_if_missing(argv[index + 1])
  return argv


def _packaged_if_missing(value: str) -> str:
  path, colon, args = value.partition(":")
  packaged = PACKAGED_CONFIGS / path[len(CONFIG_PREFIX):]
  if path.startswith(CONFIG_PREFIX) and not os.path.exists(path) and packaged.is_file():
    return str(packaged) + colon + args
  return value
