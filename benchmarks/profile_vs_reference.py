"""Where the time of one train step goes, md4 against google-deepmind/md4, as one JSON object.

python benchmarks/profile_vs_reference.py --reference=/path/to/google-deepmind/md4 \
    --width=256 --num_layers=4 --num_heads=8 --batch_size=16 --seq_len=256

Builds both train steps as benchmarks/vs_reference.py does (same flags, same
shapes), traces --profile_steps steps of each with jax.profiler, and sums the
time of every XLA operation the trace records (on CPU: one event per thunk).
Each operation is put in a kind by its instruction in the optimised HLO
(which XLA dumps into a temporary folder): "matmul" (a dot, or a fusion
around one), "fusion" (elementwise and reductions fused by XLA), or its
opcode (copy, while, ...); and in a part by the op_name JAX gave it: "rng"
(threefry: the time and mask draws), "backward" (under a transpose),
"forward" (under a jvp), or "update" (the optimizer, EMA and the rest).
Fractions of the operations' time are meaningful on a loaded machine; the
absolute times are not.
"""

import os
import sys
import tempfile

# XLA reads its flags once, at the first backend: before jax is imported.
_DUMP_DIR = tempfile.mkdtemp(prefix="md4_profile_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_dump_to={_DUMP_DIR} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_pass_re=^$")

import collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import glob
import gzip
import json
import re
from typing import Any

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

from md4 import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 10, "Steps traced per implementation.")
_TOP = flags.DEFINE_integer("top", 12, "Operations listed per implementation.")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([\w-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.-]+)")
_COMPUTATION = re.compile(r"^%?([\w.-]+) .*\{$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_RNG = ("threefry", "_uniform", "_bernoulli", "_randint", "random_bits")


def part(op_name: str, result_type: str) -> str:
  """Which part of the step an operation JAX named op_name, of result_type, belongs to."""
  # Fusions of threefry's rounds lose its name but keep its uint32 bits.
  if any(marker in op_name for marker in _RNG) or "u32[" in result_type:
    return "rng"
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def instruction_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
  """(kind, part) of every instruction of an optimised HLO module, by its name."""
  computations: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  lines = hlo_text.splitlines()
  for line in lines:
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
    elif (match := _INSTRUCTION.match(line)) and current:
      computations[current].append(match.group(3))
  kinds = {}
  for line in lines:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, result_type, opcode = match.groups()
    called = _CALLS.search(line)
    inner = computations.get(called.group(1), []) if called else []
    kind = ("matmul" if opcode in ("dot", "convolution") or {"dot", "convolution"} & set(inner)
            else opcode)
    op_name = _OP_NAME.search(line)
    kinds[name] = (kind, part(op_name.group(1) if op_name else "", result_type))
  return kinds


def dumped_modules() -> set[str]:
  return set(glob.glob(os.path.join(_DUMP_DIR, "*after_optimizations.txt")))


def module_kinds(paths: set[str]) -> dict[str, dict[str, tuple[str, str]]]:
  """instruction_kinds of the modules XLA dumped at paths, by module name."""
  result = {}
  for path in paths:
    with open(path) as f:
      text = f.read()
    name = re.search(r"HloModule ([\w.-]+)", text).group(1)
    result[name] = instruction_kinds(text)
  return result


def profile(implementation: vs_reference.Implementation, batches: list[dict[str, Any]],
            trace_dir: str) -> dict[str, Any]:
  """Per-step milliseconds of the XLA operations of --profile_steps traced steps, by kind."""
  # Both implementations name their step train_step: each reads the modules it compiled.
  earlier = dumped_modules()
  state = implementation.init(0)
  state = implementation.step(state, batches[0], 0)  # Compiles outside the trace.
  jax.block_until_ready(state)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for batch in batches[1:]:
      state = implementation.step(state, batch, 0)
    jax.block_until_ready(state)
  return summarise_trace(trace_dir, module_kinds(dumped_modules() - earlier),
                         len(batches) - 1)


def summarise_trace(trace_dir: str, kinds: dict[str, dict[str, tuple[str, str]]],
                    steps: int) -> dict[str, Any]:
  """The traced operations' time per step, and its fractions by kind, part and operation."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  by_kind, by_part, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for event in events:
    args = event.get("args", {})
    if event.get("ph") != "X" or "hlo_op" not in args:
      continue
    op = args["hlo_op"]
    kind, where = kinds.get(args.get("hlo_module", ""), {}).get(op, ("other", "other"))
    by_kind[kind] += event["dur"]
    by_part[(where, "matmul" if kind == "matmul" else "other")] += event["dur"]
    by_op[(op, kind, where)] += event["dur"]
  total = sum(by_kind.values())
  return {
      "op_ms_per_step": round(total / 1e3 / steps, 3),
      "by_kind": {kind: round(us / total, 4) for kind, us in by_kind.most_common()},
      "by_part": {f"{where} {kind}": round(us / total, 4)
                  for (where, kind), us in by_part.most_common()},
      "top_ops": [[op, kind, where, round(us / total, 4)] for (op, kind, where), us in
                  by_op.most_common(_TOP.value)],
  }


def main(argv):
  del argv
  reference_module = vs_reference.load_reference(vs_reference._REFERENCE.value)  # pylint: disable=protected-access
  config = vs_reference.md4_config("markov", 0, "defaults")
  dataset = data_lib.create(config)
  batches = [next(dataset.train) for _ in range(_PROFILE_STEPS.value + 1)]
  implementations = {
      "md4": vs_reference.md4_implementation(config, dataset.vocab_size),
      "reference": vs_reference.reference_implementation(reference_module, dataset.vocab_size)}
  result = {"settings": vs_reference.settings(), "backend": jax.default_backend(),
            "load_average": os.getloadavg()}
  for name, implementation in implementations.items():
    result[name] = profile(implementation, batches,
                           tempfile.mkdtemp(prefix=f"md4_profile_{name}_"))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
