"""The newcomer's path: console scripts, packaged configs, the CPU allocator, the curves PNG,
samples in TensorBoard, and the README's quoted timings."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from md4 import plots
from md4.configs import quickstart
from md4.runtime import startup
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
COMMANDS = [("md4-train", "md4.main"), ("md4-evaluate", "md4.evaluate"),
            ("md4-prepare", "md4.data.prepare")]
SHORT_RUN = ("--config.num_train_steps=20", "--config.log_every_steps=5",
             "--config.eval_every_steps=10", "--config.checkpoint_every_steps=20",
             "--config.sample_every_steps=20", "--config.sample_steps=8",
             "--config.synthetic.num_eval_examples=64")


def _flags(command: list[str]) -> set[tuple[str, str, str]]:
  """(name, type, default) of every flag the command's --helpxml lists."""
  result = subprocess.run(command + ["--helpxml"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]  # absl's help exits with 1.
  root = ElementTree.fromstring(result.stdout)
  return {(flag.findtext("name"), flag.findtext("type"), flag.findtext("default"))
          for flag in root.iter("flag")}


def _help_lists(command: list[str]) -> set[str]:
  """The flag names --help lists (absl's help: the key flags of the program)."""
  result = subprocess.run(command + ["--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  return {line.split(":")[0].strip().removeprefix("--[no]").removeprefix("--")
          for line in result.stdout.splitlines() if line.startswith("  --")}


@pytest.mark.parametrize("script, module", COMMANDS)
def test_console_script_takes_the_same_flags_as_the_module(script, module):
  assert (BIN / script).is_file(), f"{script} is not installed: pip install -e ."
  script_flags = _flags([str(BIN / script)])
  assert script_flags == _flags([sys.executable, "-m", module])
  names = {name for name, _, _ in script_flags}
  assert {"workdir"} <= names if module != "md4.data.prepare" else {"config"} <= names
  listed = _help_lists([str(BIN / script)])
  assert listed == _help_lists([sys.executable, "-m", module])
  assert listed & {"config", "workdir"}


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
  result = subprocess.run([str(BIN / "md4-train"), "--config=configs/quickstart.py",
                           "--config.seed=3", "--config.model.width=64", "--print_config"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  config = quickstart.get_config()
  config.seed, config.model.width = 3, 64
  assert printed == json.loads(config.to_json_best_effort())
  assert list(tmp_path.iterdir()) == []


def test_a_config_named_by_its_repository_path_is_found_outside_a_checkout(tmp_path):
  result = subprocess.run([str(BIN / "md4-prepare"), "--config=configs/quickstart.py",
                           "--config.synthetic.num_eval_examples=32"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1])["dataset"] == "synthetic"


def test_find_config_points_missing_repository_paths_at_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  packaged = str(startup.PACKAGED_CONFIGS / "text8.py")
  assert startup.find_config(["md4-train", "--config=configs/text8.py:arg", "--workdir=w"]) == [
      "md4-train", f"--config={packaged}:arg", "--workdir=w"]
  assert startup.find_config(["x", "--config", "configs/text8.py"]) == ["x", "--config", packaged]
  # A file that exists here is used as it is; an unknown name is left for the flag to report.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "text8.py").write_text("")
  assert startup.find_config(["x", "--config=configs/text8.py"]) == [
      "x", "--config=configs/text8.py"]
  assert startup.find_config(["x", "--config=configs/nothing.py"]) == [
      "x", "--config=configs/nothing.py"]


def test_packaged_configs_are_the_repository_files():
  import md4.configs.quickstart  # pylint: disable=g-import-not-at-top
  assert pathlib.Path(md4.configs.quickstart.__file__).resolve() == (
      REPO / "configs" / "quickstart.py").resolve()


@pytest.mark.parametrize("environment, expected", [
    # libtpu (md4's tpu extra) counts as an accelerator plugin unless JAX_PLATFORMS says cpu.
    ({}, importlib.util.find_spec("libtpu") is None), ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False)])
def test_host_allocator_is_set_on_cpu_hosts_only(environment, expected):
  env = {key: value for key, value in os.environ.items()
         if key not in ("JAX_PLATFORMS", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX")}
  result = subprocess.run(
      [sys.executable, "-c", "from md4.runtime import startup; print(startup.keep_host_buffers())"],
      env={**env, **environment}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(expected)


def test_curves_keep_the_last_value_of_a_step_and_skip_non_finite_values():
  records = [{"step": 10, "bits_per_token": 4.0}, {"step": 20, "bits_per_token": "nan"},
             {"step": 20, "eval_bits_per_token": 3.5, "eval_bits_per_token_stderr": 0.1,
              "data_entropy_bits_per_token": 2.0},
             {"step": 10, "bits_per_token": 3.9}, {"step": 30, "bits_per_token": 3.0}]
  assert plots.curves(records) == {"train": [[10, 3.9], [30, 3.0]],
                                   "held_out": [[20, 3.5, 0.1]], "entropy": 2.0}
  with pytest.raises(ValueError, match="no finite"):
    plots.render(plots.curves([{"step": 1, "loss": 1.0}]), "")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> pathlib.Path:
  """A 20-step quick start through the installed md4-train."""
  workdir = tmp_path_factory.mktemp("short_run")
  result = subprocess.run([str(BIN / "md4-train"), "--config=configs/quickstart.py",
                           f"--workdir={workdir}", *SHORT_RUN],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "held-out NELBO" in result.stdout
  return workdir


def test_end_of_run_png_shows_the_curves_of_metrics_jsonl(short_run):
  path = short_run / plots.CURVES_FILE
  assert path.stat().st_size > 5000
  image = Image.open(path)
  assert image.format == "PNG" and image.size == plots.SIZE
  image.load()
  shown = json.loads(image.text[plots.TEXT_CHUNK])
  records = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
  train = [[r["step"], r["bits_per_token"]] for r in records if "bits_per_token" in r]
  held_out = [[r["step"], r["eval_bits_per_token"], r["eval_bits_per_token_stderr"]]
              for r in records if "eval_bits_per_token" in r]
  assert shown["train"] == train and [r[0] for r in train] == [5, 10, 15, 20]
  assert shown["held_out"] == held_out and [r[0] for r in held_out] == [10, 20]
  entropy = [r["data_entropy_bits_per_token"] for r in records
             if "data_entropy_bits_per_token" in r][-1]
  assert shown["entropy"] == entropy

  # Each point is drawn where the stored mapping puts it, in its series' colour.
  pixels = np.asarray(image.convert("RGB")).astype(int)
  x_min, x_max, y_min, y_max = shown["limits"]
  left, top, right, bottom = shown["box"]

  def pixel(x, y):
    return (round(left + (x - x_min) / (x_max - x_min) * (right - left)),
            round(bottom - (y - y_min) / (y_max - y_min) * (bottom - top)))

  def is_colour(column, row, colour):
    patch = pixels[row - 1:row + 2, column - 1:column + 2]
    return bool((np.abs(patch - colour).sum(axis=-1) < 30).any())

  markers = [pixel(step, bits) for step, bits, _ in held_out]
  for column, row in markers:
    assert is_colour(column, row, shown["colors"]["held_out"]), (column, row)
  for step, bits in train:
    column, row = pixel(step, bits)
    if all(abs(column - c) + abs(row - r) > 8 for c, r in markers):  # Not under a marker.
      assert is_colour(column, row, shown["colors"]["train"]), (step, bits)
  _, entropy_row = pixel(x_min, shown["entropy"])
  dashed = [is_colour(column, entropy_row, shown["colors"]["entropy"])
            for column in range(left + 1, right)]
  assert 0.4 < np.mean(dashed) < 0.9


def _tensorboard_run(workdir: pathlib.Path, run: str) -> event_accumulator.EventAccumulator:
  events = event_accumulator.EventAccumulator(
      str(workdir / "tensorboard" / run),
      size_guidance={event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0,
                     event_accumulator.SCALARS: 0})
  events.Reload()
  return events


def test_samples_and_curves_reach_tensorboard(short_run):
  evaluation = _tensorboard_run(short_run, "eval")
  texts = evaluation.Tensors("samples/text")
  assert [event.step for event in texts] == [20]
  written = (short_run / "samples" / "step_20.txt").read_text().splitlines()
  assert [line.decode() for line in texts[0].tensor_proto.string_val] == written
  (curves,) = _tensorboard_run(short_run, "train").Images("curves")
  assert curves.encoded_image_string == (short_run / plots.CURVES_FILE).read_bytes()


def test_tensorboard_overlays_train_eval_and_source_on_one_tag(short_run):
  records = [json.loads(line) for line in (short_run / "metrics.jsonl").open()]
  runs = {run: _tensorboard_run(short_run, run) for run in ("train", "eval", "source")}
  for run, name in (("train", "bits_per_token"), ("eval", "eval_bits_per_token"),
                    ("source", "data_entropy_bits_per_token")):
    logged = [(record["step"], record[name]) for record in records if name in record]
    shown = runs[run].Scalars("nelbo/bits_per_token")
    assert logged and [event.step for event in shown] == [step for step, _ in logged], run
    np.testing.assert_allclose([event.value for event in shown], [bits for _, bits in logged],
                               rtol=1e-6)
  groups = {tag.split("/")[0] for events in runs.values() for tag in events.Tags()["scalars"]}
  assert groups == {"nelbo", "train", "eval", "samples", "system"}
  assert {"train/param_norm", "system/steps_per_sec"} <= set(runs["train"].Tags()["scalars"])
  assert "eval/bits_per_token_stderr" in runs["eval"].Tags()["scalars"]


def test_readme_quotes_the_committed_benchmark_results():
  benchmark = helpers.load_benchmark("quickstart")
  results = json.loads(benchmark.RESULTS.read_text())
  readme = (REPO / "README.md").read_text()
  quick_start = benchmark.readme_section(readme, "Quick start")
  assert benchmark.readme_figures(results) in " ".join(quick_start.split())
  assert results["command"] == benchmark.readme_command(readme, "Quick start")
  # The bound holds whatever the machine's load; the times are what that run measured.
  assert all(0 < run["gap"] < 0.25 for run in results["runs"])


def test_text_quick_start_trains_on_word_pieces_of_the_bundled_text(tmp_path):
  """configs/quickstart_text.py as shipped (its own tokenizer, the bundled text), for 10 steps."""
  workdir, data_dir = tmp_path / "workdir", tmp_path / "data"
  result = subprocess.run(
      [str(BIN / "md4-train"), "--config=configs/quickstart_text.py", f"--workdir={workdir}",
       f"--config.data_dir={data_dir}", "--config.num_train_steps=10",
       "--config.eval_every_steps=10", "--config.num_eval_steps=2", "--config.sample_steps=8"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "held-out NELBO" in result.stdout
  manifest = json.loads((data_dir / "tokens" / "tinyshakespeare_sp_bpe1024" /
                         "manifest.json").read_text())
  assert manifest["vocab_size"] == 1024
  samples = (workdir / "samples" / "step_10.txt").read_text().splitlines()
  assert len(samples) == 8 and all(sample.strip() for sample in samples)
  corpus = set((REPO / "md4" / "data" / "assets" / "tinyshakespeare.txt").read_text())
  assert set("".join(samples).replace("\\n", "\n")) <= corpus | {" "}


def test_readme_sampling_table_is_the_committed_benchmark_output():
  benchmark = helpers.load_benchmark("sampling_quality")
  results = json.loads(benchmark.RESULTS.read_text())
  table = benchmark.markdown([results["source"], *results["rows"]])
  assert table in (REPO / "README.md").read_text()
  assert results["num_samples"] == 256 and results["step"] == 1000
