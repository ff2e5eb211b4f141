"""md4.compile: programs compiled for a TPU slice on this machine (libtpu, md4's tpu extra)."""

import importlib
import json
import re
import subprocess
import sys

import pytest

from configs import text8
from md4 import compile as compile_lib

V5E_2X2 = "v5e:2x2"
# The paper configs md4-compile has measured; the other image configs are not yet (issue 26).
COMPILED_CONFIGS = ["text8", "owt", "genmd4_text8", "prime_text8", "owt_prime", "genmd4_owt",
                    "cifar10"]


def test_accelerator_types_map_to_topologies():
  assert compile_lib.parse_topology("v5litepod-8").topology == "v5e:2x4"
  assert compile_lib.parse_topology("v5litepod-256").topology == "v5e:16x16"
  assert compile_lib.parse_topology("v4-8").topology == "v4:2x2x1"  # v4-N counts cores.
  assert compile_lib.parse_topology("v5p-16").topology == "v5:2x2x2"
  assert compile_lib.parse_topology("v6e-8").chips == 8
  assert compile_lib.parse_topology("v5e:4x8").chips == 32
  for bad in ("v5litepod-6", "v9-8", "tpu", "v5e:2y2"):
    with pytest.raises(ValueError, match="--topology"):
      compile_lib.parse_topology(bad)


def test_collectives_are_counted_from_hlo_text():
  hlo = """
  %all-reduce.1 = f32[1024,768]{1,0} all-reduce(f32[1024,768]{1,0} %p), replica_groups={}
  %ags = (bf16[64,8]{1,0}, bf16[256,8]{1,0}) all-gather-start(bf16[64,8]{1,0} %q)
  %rs = f32[16]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}
%all-reduce-scatter.3 (input_0: f32[32,8]) -> (f32[8,8]) {
  %all-reduce.9 = (f32[32,8]{1,0}) all-reduce(%input_0), replica_groups={{0,1,2,3}}
}
  """
  found = compile_lib.collectives(hlo)
  assert found == {"all-reduce": {"count": 1, "bytes": 1024 * 768 * 4},
                   "all-gather": {"count": 1, "bytes": 256 * 8 * 2},
                   "reduce-scatter": {"count": 2, "bytes": 16 * 4 + 8 * 8 * 4}}
  assert compile_lib.collective_bytes(found) == (2 * 1024 * 768 * 4 + 256 * 8 * 2 + 16 * 4
                                                 + 8 * 8 * 4)


def _needs_libtpu():
  pytest.importorskip("libtpu", reason="md4's tpu extra (pip install 'md4[tpu]') is absent")


def _small_text8(**overrides):
  """configs/text8.py at 2 layers and batch 32 of 256 characters: the paper layout, quicker."""
  config = text8.get_config()
  config.model.num_layers = 2
  config.update(batch_size=32, seq_len=256, num_samples=4, sample_steps=8, **overrides)
  return config


@pytest.mark.slow
def test_quickstart_command_prints_one_json_line_and_fits():
  _needs_libtpu()
  done = subprocess.run([sys.executable, "-m", "md4.compile", "--config=configs/quickstart.py",
                         "--topology=v5litepod-4"], capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(done.stdout.strip().splitlines()[-1])
  assert report["topology"] == V5E_2X2 and report["chips"] == 4
  assert set(report["programs"]) == {"train_step", "eval_step", "sample_step"}
  for name, program in report["programs"].items():
    assert program["fits"] and 0 < program["peak_bytes"] < report["hbm_bytes_per_chip"], name
    assert name in done.stderr
  assert report["estimate"]["step_seconds"] > 0 and 0 < report["estimate"]["mfu"] <= 1


@pytest.mark.slow
def test_fsdp_shards_the_state_and_gathers_what_data_parallelism_reduces():
  _needs_libtpu()
  tpu_slice = compile_lib.parse_topology(V5E_2X2)
  data = compile_lib.compile_config(_small_text8(), tpu_slice)["programs"]["train_step"]
  fsdp = compile_lib.compile_config(
      _small_text8(mesh_shape=(1, -1), mesh_axes=("data", "fsdp")), tpu_slice
  )["programs"]["train_step"]
  assert data["fits"] and fsdp["fits"]
  # Arguments: the state (parameters, Adam's moments, EMA) and a batch shard of 8 x 256 ids.
  batch_bytes = 8 * 256 * 4
  replicated_state = data["argument_bytes"] - batch_bytes
  assert fsdp["argument_bytes"] - batch_bytes <= replicated_state / 3
  assert "all-reduce" in data["collectives"]
  assert not {"all-gather", "reduce-scatter"} & set(data["collectives"])
  assert {"all-gather", "reduce-scatter"} <= set(fsdp["collectives"])


@pytest.mark.slow
def test_a_program_that_does_not_fit_is_one_error_line():
  _needs_libtpu()
  done = subprocess.run([sys.executable, "-m", "md4.compile", "--config=configs/text8.py",
                         "--topology=v5litepod-1", "--config.batch_size=4096",
                         "--config.model.num_layers=2"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 1
  errors = [line for line in done.stderr.splitlines() if line.startswith("md4: error:")]
  assert len(errors) == 1 and "does not fit" in errors[0] and "remat_policy" in errors[0]


@pytest.mark.parametrize("name", COMPILED_CONFIGS)
def test_each_paper_config_names_its_slice_and_what_md4_compile_measured(name):
  doc = importlib.import_module(f"configs.{name}").__doc__
  slice_paragraph = " ".join(doc[doc.index("Slice:"):].split())
  assert f"md4-compile --config=configs/{name}.py --topology=" in slice_paragraph
  assert re.search(r"peaks? at \d+\.\d+ GiB per chip of \d+ GiB \(\d+% to spare\)",
                   slice_paragraph), name
  assert re.search(r"estimated \d+\.\d+ s per step \(\w+-bound roofline, MFU 0\.\d+\)",
                   slice_paragraph), name
