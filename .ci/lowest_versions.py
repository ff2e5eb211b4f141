"""Prints `name==version` for every lower bound in pyproject.toml: the oldest versions md4 allows.

python .ci/lowest_versions.py [EXTRA ...] > constraints.txt; the base dependencies
and the named extras are read (an extra naming md4 itself pulls in that extra).
"""

import re
import sys
import tomllib

_LOWER_BOUND = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def lowest_versions(project: dict, extras: list[str]) -> list[str]:
  """Pins for the dependencies and extras of the [project] table."""
  requirements = list(project["dependencies"])
  pending, seen = list(extras), set()
  while pending:
    extra = pending.pop()
    if extra in seen:
      continue
    seen.add(extra)
    for requirement in project["optional-dependencies"][extra]:
      inner = re.fullmatch(re.escape(project["name"]) + r"\[([^\]]+)\]", requirement)
      if inner:
        pending.extend(name.strip() for name in inner.group(1).split(","))
      else:
        requirements.append(requirement)
  pins = []
  for requirement in requirements:
    match = _LOWER_BOUND.match(requirement)
    if match is None:
      raise SystemExit(f"pyproject.toml: {requirement!r} has no lower bound (>=) to test")
    pins.append(f"{match.group(1)}=={match.group(2)}")
  return sorted(set(pins))


if __name__ == "__main__":
  with open("pyproject.toml", "rb") as f:
    print("\n".join(lowest_versions(tomllib.load(f)["project"], sys.argv[1:])))
