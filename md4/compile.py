"""md4-compile: compiles a config for a TPU slice ahead of time, on any machine, without data.

    python -m md4.compile --config=configs/owt.py --topology=v5litepod-8

needs libtpu beside JAX (`pip install 'md4[tpu]'`), but no TPU and no prepared
dataset: the vocabulary and example shape come from the config and its
tokenizer settings (`md4.data.shapes`). TOPOLOGY is a Cloud TPU accelerator
type as gcloud spells it (v4-8, v5litepod-8 ... v5litepod-256, v5p-8 ...,
v6e-8 ...) or a JAX topology string (v5e:2x4, v4:2x2x2). It builds the
trainer over a Mesh of that slice's devices with the config's mesh and
sharding rules, and compiles the train step, the eval step and the
configured sampler. Each program gets one line on stderr; the last line of
stdout is one JSON object:

    {"topology", "chips", "hbm_bytes_per_chip",
     "programs": {"train_step": {"argument_bytes", "output_bytes", "temp_bytes",
                                 "alias_bytes", "peak_bytes", "fits", "flops",
                                 "bytes_accessed", "collectives", "compile_seconds"},
                  "eval_step": {...}, "sample_step": {...}},
     "estimate": {"step_seconds", "mfu", "bound_by", "peaks_used"}}

Bytes, flops and collectives are per chip. peak_bytes = arguments + outputs -
aliased (donated) + temporaries. collectives: {op: {"count", "bytes"}} of the
compiled HLO text, each op counted once where it appears (an op inside a loop
body, e.g. under model.scan_layers, once however often the loop runs).

The estimate is a roofline of the train step: the largest of flops / peak
bf16 flops, bytes accessed / HBM bandwidth and collective bytes / ICI
bandwidth (an all-reduce moves its bytes twice: reduce-scatter, then
all-gather), with the chip's published figures (`CHIPS`). It is a lower
bound: the three overlap perfectly in it. mfu counts the model's flops, 3x
those of its forward pass (the eval step's flops per sequence, times the
batch), so recomputation under model.remat_policy is not counted as useful.
A program that does not fit in HBM is an `md4: error:` naming its largest
buffers and what to change, exit code 1.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import flags
from absl import logging

from md4 import main as main_lib
from md4.runtime import errors
from md4.runtime import startup

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's published figures.

  Attributes:
    bf16_flops: peak bf16 flop/s.
    hbm_bytes: HBM capacity.
    hbm_bandwidth: HBM bytes/s.
    ici_bandwidth: bidirectional inter-chip interconnect bytes/s.
    megacore: two TensorCores act as one device (v4, v5p); accelerator
      names count cores, so a v4-8 has 4 chips.
    source: where the figures come from.
  """

  bf16_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  ici_bandwidth: float
  megacore: bool
  source: str


# Keyed by the JAX topology prefix (v5p's is "v5").
CHIPS = {
    "v4": Chip(275e12, 32 * GiB, 1200e9, 300e9, True,
               "cloud.google.com/tpu/docs/v4; ICI: 6 links of 50 GB/s (Jouppi et al., TPU v4, "
               "ISCA 2023)"),
    "v5e": Chip(197e12, 16 * GiB, 819e9, 400e9, False, "cloud.google.com/tpu/docs/v5e"),
    "v5": Chip(459e12, 95 * GiB, 2765e9, 1200e9, True, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 32 * GiB, 1638e9, 800e9, False, "cloud.google.com/tpu/docs/v6e"),
}
# Accelerator-type prefix -> JAX topology prefix.
ACCELERATOR_PREFIXES = {"v4": "v4", "v5litepod": "v5e", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
# Chips -> the slice's shape, as Cloud TPU lays out the standard slices.
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.-]+) \(.*\) -> (?P<result>.*) \{$")
_ARRAY_SHAPE = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8\w*)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its JAX topology string and chip."""

  topology: str
  chip: Chip

  @property
  def chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))


def parse_topology(name: str) -> Slice:
  """A Cloud TPU accelerator type (v5litepod-8) or a JAX topology string (v5e:2x4)."""
  if ":" in name:
    prefix, _, grid = name.partition(":")
    if prefix not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", grid):
      raise ValueError(f"--topology={name!r}: a JAX topology is <chip>:<grid>, chip one of "
                       f"{', '.join(CHIPS)}, e.g. v5e:2x4 or v4:2x2x2")
    return Slice(name, CHIPS[prefix])
  prefix, _, count = name.rpartition("-")
  if prefix not in ACCELERATOR_PREFIXES or not count.isdigit():
    raise ValueError(f"--topology={name!r}: give a Cloud TPU accelerator type "
                     f"({', '.join(p + '-N' for p in ACCELERATOR_PREFIXES)}) or a JAX "
                     "topology string such as v5e:2x4")
  jax_prefix = ACCELERATOR_PREFIXES[prefix]
  chip = CHIPS[jax_prefix]
  chips = int(count) // 2 if chip.megacore else int(count)
  grids = GRIDS_3D if jax_prefix in ("v4", "v5") else GRIDS_2D
  if chips not in grids:
    sizes = ", ".join(f"{prefix}-{c * 2 if chip.megacore else c}" for c in grids)
    raise ValueError(f"--topology={name!r} is not a standard slice; known: {sizes}, or give "
                     "its JAX topology string (e.g. v5e:4x8)")
  return Slice(f"{jax_prefix}:{grids[chips]}", chip)


def topology_devices(tpu_slice: Slice) -> list[Any]:
  """The slice's devices from libtpu's topology description (no TPU needed)."""
  # Nothing runs on a TPU here, so other processes (a training run, parallel tests) may hold it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  dims = [int(d) for d in tpu_slice.topology.split(":")[1].split("x")]
  dims += [1] * (3 - len(dims))
  # A 2D slice wraps into a torus along a full 16-chip side; a 3D one when it is whole cubes.
  if tpu_slice.chip.megacore:
    wrap = (all(d % 4 == 0 for d in dims),) * 3
  else:
    wrap = tuple(d == 16 for d in dims)
  try:
    return topologies.get_topology_desc(
        platform="tpu", topology_name=tpu_slice.topology,
        chip_config_name="megacore" if tpu_slice.chip.megacore else "default",
        chips_per_host_bounds=(2, 2, 1) if math.prod(dims) >= 4 else (1, 1, 1),
        num_slices=1, wrap=wrap).devices
  except (RuntimeError, ValueError) as error:
    if "libtpu" in str(error).lower() or "tpu" not in str(error).lower():
      raise ValueError(f"libtpu could not describe {tpu_slice.topology}: install md4's tpu extra "
                       f"(pip install 'md4[tpu]') ({error})") from error
    raise ValueError(f"--topology {tpu_slice.topology}: {error}") from error


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in compiled HLO text (bytes of their results).

  TPU fuses a reduce-scatter into a computation named all-reduce-scatter.N (an
  all-reduce inside, the scatter in the fusion's output): it counts as one
  reduce-scatter of its output's bytes.
  """
  found = {}
  inside_fused_scatter = False
  for line in hlo_text.splitlines():
    computation = _COMPUTATION.match(line)
    if computation:
      inside_fused_scatter = computation["name"].startswith("all-reduce-scatter")
      if inside_fused_scatter:
        _add(found, "reduce-scatter", _ARRAY_SHAPE.findall(computation["result"]))
      continue
    match = _COLLECTIVE_LINE.search(line)
    if match and not inside_fused_scatter:
      arrays = _ARRAY_SHAPE.findall(match["shape"])
      if match["shape"].startswith("(") and match.group(0).rstrip("(").endswith("-start"):
        arrays = arrays[len(arrays) // 2:]  # An async start's tuple: (operands, results).
      _add(found, match["op"], arrays)
  return found


def _add(found: dict[str, dict[str, int]], op: str, arrays: list[tuple[str, str]]) -> None:
  entry = found.setdefault(op, {"count": 0, "bytes": 0})
  entry["count"] += 1
  entry["bytes"] += sum(_dtype_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)
                        for dtype, dims in arrays)


def _dtype_bytes(dtype: str) -> int:
  if dtype in _DTYPE_BYTES:
    return _DTYPE_BYTES[dtype]
  return max(int(re.sub(r"\D", "", dtype)[:2] or 8) // 8, 1)


def collective_bytes(found: dict[str, dict[str, int]]) -> int:
  """Bytes a chip sends over ICI for them, an all-reduce counting twice."""
  return sum(entry["bytes"] * (2 if op == "all-reduce" else 1) for op, entry in found.items())


def program_report(compiled: Any, seconds: float, hbm_bytes: int) -> dict[str, Any]:
  """Memory, cost and collectives of one compiled program, per chip."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "peak_bytes": int(peak),
      "fits": bool(peak <= hbm_bytes),
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "collectives": collectives(compiled.as_text()),
      "compile_seconds": round(seconds, 2),
  }


def estimate(train: dict[str, Any], model_flops: float, chip: Chip) -> dict[str, Any]:
  """The roofline step time of the train step and its model flops utilisation."""
  times = {"compute": train["flops"] / chip.bf16_flops,
           "hbm": train["bytes_accessed"] / chip.hbm_bandwidth,
           "ici": collective_bytes(train["collectives"]) / chip.ici_bandwidth}
  bound_by = max(times, key=times.get)
  step = times[bound_by]
  return {"step_seconds": step, "mfu": model_flops / (step * chip.bf16_flops) if step else 0.0,
          "bound_by": bound_by, "seconds": times,
          "peaks_used": {"bf16_flops": chip.bf16_flops, "hbm_bandwidth": chip.hbm_bandwidth,
                         "ici_bandwidth": chip.ici_bandwidth, "hbm_bytes": chip.hbm_bytes,
                         "source": chip.source}}


def describe(name: str, report: dict[str, Any], hbm_bytes: int) -> str:
  """One line per program for stderr."""
  moved = ", ".join(f"{op} x{entry['count']} ({entry['bytes'] / 1e6:.1f} MB)"
                    for op, entry in sorted(report["collectives"].items())) or "none"
  return (f"{name}: peak {report['peak_bytes'] / GiB:.2f} of {hbm_bytes / GiB:.2f} GiB per chip "
          f"({'fits' if report['fits'] else 'DOES NOT FIT'}; arguments "
          f"{report['argument_bytes'] / GiB:.2f}, temporaries {report['temp_bytes'] / GiB:.2f}), "
          f"{report['flops'] / 1e12:.2f} TFLOP, {report['bytes_accessed'] / 1e9:.1f} GB "
          f"accessed, collectives: {moved}; compiled in {report['compile_seconds']:.1f} s")


_ADVICE = ("set --config.model.remat_policy=full, --config.loss_chunk_size=128 (transformer "
           "text models with a large vocabulary), raise --config.grad_accum_steps, shard "
           "parameters with a fsdp mesh axis (--config.mesh_shape='(1,-1)' "
           "--config.mesh_axes='(\"data\",\"fsdp\")'), or use a slice with more chips")


def largest_arrays(lowered_text: str, count: int = 3) -> list[str]:
  """The largest distinct array types of a lowered (StableHLO) program, global shapes."""
  types = set(re.findall(r"tensor<((?:\d+x)+[a-z]+\d*)>", lowered_text))
  def size(type_text: str) -> int:
    *dims, dtype = type_text.split("x")
    return math.prod(int(d) for d in dims) * _dtype_bytes("pred" if dtype == "i1" else dtype)
  largest = sorted(types, key=size, reverse=True)[:count]
  return [f"{t.rsplit('x', 1)[1]}[{','.join(t.split('x')[:-1])}] ({size(t) / GiB:.1f} GiB)"
          for t in largest]


def out_of_memory(name: str, error: Exception, lowered_text: str) -> ValueError:
  """The one-line error for a program XLA could not fit, its largest arrays named."""
  needed = re.search(r"(?:HLO temporaries|Used)[^\n]*?exceeds[^\n]*?\)", str(error))
  return ValueError(
      f"{name} does not fit in HBM: {needed[0] if needed else str(error)[:300]}; its largest "
      f"arrays (whole, before sharding): {'; '.join(largest_arrays(lowered_text))}; to fit, "
      f"{_ADVICE}")


def compile_config(config: Any, tpu_slice: Slice) -> dict[str, Any]:
  """Compiles config's programs for tpu_slice; the report the module docstring describes."""
  import jax  # pylint: disable=g-import-not-at-top
  from md4 import data as data_lib  # pylint: disable=g-import-not-at-top
  from md4 import defaults  # pylint: disable=g-import-not-at-top
  from md4 import models  # pylint: disable=g-import-not-at-top
  from md4.runtime import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from md4 import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  # The programs are for the slice; whatever runs here (tracing) runs on the CPU.
  jax.config.update("jax_platforms", "cpu")
  config = defaults.validate(config)
  mesh = sharding_lib.make_mesh(config, topology_devices(tpu_slice))
  sharding_lib.check_batch(config, mesh)
  shapes = data_lib.shapes(config)
  model = models.create(config, shapes.vocab_size, shapes.example_shape, shapes.num_classes)
  trainer = trainer_lib.compile_steps(config, model, mesh)
  replicated = sharding_lib.replicated(mesh)
  rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=replicated)
  state = jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(
      shape.shape, shape.dtype, sharding=sharding),
      jax.eval_shape(trainer.init, rng), trainer.state_sharding)
  batch = {"x": jax.ShapeDtypeStruct((config.batch_size, *shapes.example_shape), jax.numpy.int32,
                                     sharding=trainer.batch_sharding)}
  if model.num_classes:
    batch["label"] = jax.ShapeDtypeStruct((config.batch_size,), jax.numpy.int32,
                                          sharding=trainer.batch_sharding)
  programs = {
      "train_step": lambda: trainer.train_step.lower(state, batch, rng),
      "eval_step": lambda: trainer.eval_step.lower(state.ema_params, batch, rng),
      "sample_step": lambda: trainer.sample.lower(state.ema_params, rng, config.num_samples, 0),
  }
  hbm = tpu_slice.chip.hbm_bytes
  reports, failures = {}, []
  for name, lower in programs.items():
    start = time.perf_counter()
    lowered = lower()
    try:
      compiled = lowered.compile()
    except Exception as error:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      failures.append(out_of_memory(name, error, lowered.as_text()))
      print(f"md4-compile: {name}: does not fit", file=sys.stderr, flush=True)
      continue
    reports[name] = program_report(compiled, time.perf_counter() - start, hbm)
    print(describe(name, reports[name], hbm), file=sys.stderr, flush=True)
    if not reports[name]["fits"]:
      failures.append(ValueError(
          f"{name} needs {reports[name]['peak_bytes'] / GiB:.2f} GiB per chip of "
          f"{hbm / GiB:.2f}; to fit, {_ADVICE}"))
  if failures:
    raise failures[0]
  eval_report = reports["eval_step"]
  model_flops = 3 * eval_report["flops"] / config.eval_num_t
  return {"topology": tpu_slice.topology, "chips": tpu_slice.chips, "hbm_bytes_per_chip": hbm,
          "programs": reports,
          "estimate": estimate(reports["train_step"], model_flops, tpu_slice.chip)}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  given = flags.FLAGS
  report = compile_config(errors.loaded(given.config), parse_topology(given.topology))
  train = report["estimate"]
  print(f"md4-compile: {report['topology']} ({report['chips']} chips): train step about "
        f"{train['step_seconds'] * 1e3:.1f} ms ({train['bound_by']}-bound), MFU "
        f"{train['mfu']:.2f}", file=sys.stderr, flush=True)
  print(json.dumps(report))


def cli() -> None:
  """`python -m md4.compile` and `md4-compile`."""
  main_lib.define_config_flag()
  flags.DEFINE_string("topology", None, "Cloud TPU accelerator type (v5litepod-8, v4-8, v5p-8, "
                      "v6e-8, ...) or JAX topology string (v5e:2x4).")
  flags.mark_flags_as_required(["config", "topology"])
  logging.set_verbosity(logging.WARNING)
  errors.run(main, argv=startup.find_config(sys.argv))


if __name__ == "__main__":
  cli()
