"""Registries that the modules of a package fill when imported (data sources, samplers)."""

import importlib
import pkgutil
from typing import Any, Iterable


class Registry:
  """Entries with a `name`, each added by its module's import; the package's modules
  are imported on the first lookup, so that every built-in entry is there."""

  def __init__(self, package: str, path: Iterable[str], kind: str):
    self._package, self._path, self._kind = package, list(path), kind
    self._entries: dict[str, Any] = {}
    self._imported = False

  def register(self, entry: Any) -> Any:
    """Adds entry (its module's import does this); returns it."""
    known = self._entries.get(entry.name)
    if known is not None and known != entry:
      raise ValueError(f"a {self._kind} named {entry.name!r} is already registered")
    self._entries[entry.name] = entry
    return entry

  def unregister(self, name: str) -> None:
    """Removes an entry added by `register` (tests use this to clean up)."""
    self._entries.pop(name, None)

  def entries(self) -> dict[str, Any]:
    """Every entry by name, the package's own imported first."""
    if not self._imported:
      for module in pkgutil.iter_modules(self._path):
        importlib.import_module(f"{self._package}.{module.name}")
      self._imported = True
    return dict(self._entries)
