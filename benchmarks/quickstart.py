"""Times the README's quick start as a new user runs it, install included, as one JSON object.

python benchmarks/quickstart.py [--output=benchmarks/results/quickstart.json] [--runs=1]

In a fresh copy of the repository (the files git tracks or would track), it
runs the README's Quick start command: the install part once (timed), then
the training command --runs times, each in a new workdir, and reports their
wall times, steps/s (steps over the command's wall time, and the median of
the loop's logged rate) and final gap to the source's entropy. Also timed:
`python -m md4.main --help`, and a one-step run of the same config (an upper
bound on the time to the first training step: it also evaluates one batch,
samples and checkpoints). The f32 matmul peak of the machine is measured
before and after (`benchmarks/train_step.py`'s measurement). The README's
quoted figures are `readme_figures(results)`, which a test checks against
the committed results file.
"""

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "quickstart.json"
TRAIN_PREFIX = "python -m md4.main"
ONE_STEP = ("--config.num_train_steps=1", "--config.num_eval_steps=1",
            "--config.synthetic.num_eval_examples=32")
_PEAK = ("import jax.numpy as jnp, sys; sys.path.insert(0, 'benchmarks'); "
         "import train_step; print(train_step.matmul_peak_flops(jnp.float32, 2048))")
_SUMMARY = re.compile(r"held-out NELBO: ([\d.]+) bits per token; source entropy: ([\d.]+)")


def readme_section(readme: str, title: str) -> str:
  """The text of the README section `## title`, up to the next `## `."""
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
  if match is None:
    raise ValueError(f"README has no '## {title}' section")
  return match.group(1)


def readme_command(readme: str, title: str) -> str:
  """The first ```bash block of README section `title`, as one line."""
  block = re.search(r"```bash\n(.*?)```", readme_section(readme, title), re.S)
  if block is None:
    raise ValueError(f"README section '{title}' has no ```bash block")
  return " ".join(block.group(1).split())


def copy_repository(destination: pathlib.Path) -> None:
  """The files git tracks or would track (not ignored), symlinks as symlinks."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, check=True, capture_output=True).stdout
  for name in filter(None, listed.decode().split("\0")):
    source = REPO / name
    if not os.path.lexists(source):
      continue  # Deleted in the work tree, not yet committed.
    target = destination / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target, follow_symlinks=False)


def run(command: str, cwd: pathlib.Path) -> tuple[float, str]:
  """(wall seconds, stdout + stderr) of a bash command; raises on failure."""
  start = time.perf_counter()
  done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"`{command}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
  return seconds, done.stdout + done.stderr


def training_run(activate: str, command: str, cwd: pathlib.Path,
                 workdir: pathlib.Path) -> dict[str, float]:
  seconds, output = run(f"{activate} && {command} --workdir={workdir}", cwd)
  summary = _SUMMARY.search(output)
  if summary is None:
    raise RuntimeError(f"no summary line in the output of `{command}`:\n{output[-3000:]}")
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = max(record["step"] for record in records)
  logged = [record["steps_per_sec"] for record in records if "steps_per_sec" in record]
  bound, entropy = map(float, summary.groups())
  return {"wall_seconds": seconds, "steps": steps, "steps_per_sec": steps / seconds,
          "loop_steps_per_sec": statistics.median(logged),
          "bits_per_token": bound, "entropy_bits_per_token": entropy, "gap": bound - entropy}


def measure(runs: int) -> dict[str, object]:
  readme = (REPO / "README.md").read_text()
  command = readme_command(readme, "Quick start")
  install, train = command.split(f" && {TRAIN_PREFIX}")
  train = TRAIN_PREFIX + train
  activate = ". .venv/bin/activate"
  with tempfile.TemporaryDirectory(prefix="md4_quickstart_") as folder:
    folder = pathlib.Path(folder)
    checkout = folder / "md4"
    copy_repository(checkout)
    load_before = os.getloadavg()
    install_seconds, _ = run(install, checkout)
    peak_before = float(run(f"{activate} && python -c \"{_PEAK}\"", checkout)[1].split()[-1])
    # absl's --help exits with 1.
    help_seconds, _ = run(f"{activate} && {TRAIN_PREFIX} --help; test $? = 1", checkout)
    one_step_seconds, _ = run(
        f"{activate} && {train} --workdir={folder / 'one_step'} {' '.join(ONE_STEP)}", checkout)
    trainings = [training_run(activate, train, checkout, folder / f"run{index}")
                 for index in range(runs)]
    peak_after = float(run(f"{activate} && python -c \"{_PEAK}\"", checkout)[1].split()[-1])
    load_after = os.getloadavg()
  median = {key: statistics.median(run[key] for run in trainings) for key in trainings[0]}
  return {
      "command": command,
      "machine": {"cpus": os.cpu_count(), "processor": _processor(),
                  "python": platform.python_version(),
                  "matmul_peak_flops_f32": [peak_before, peak_after],
                  # Runnable processes (1, 5, 15-minute means): other work on a shared machine.
                  "load_average_before": load_before, "load_average_after": load_after},
      "install_seconds": install_seconds,
      "help_seconds": help_seconds,
      "one_step_run_seconds": one_step_seconds,
      "train_wall_seconds": median["wall_seconds"],
      "steps_per_sec": median["steps_per_sec"],
      "gap_bits_per_token": median["gap"],
      "runs": trainings,
  }


def _processor() -> str:
  try:
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  match = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
  return match.group(1) if match else platform.processor()


def minutes(seconds: float) -> str:
  """125.4 -> '2 min 05 s'."""
  whole = round(seconds)
  return f"{whole // 60} min {whole % 60:02d} s"


def readme_figures(results: dict[str, object]) -> str:
  """The sentence the README quotes, made from a results file."""
  peaks = results["machine"]["matmul_peak_flops_f32"]
  return (f"Measured on a {results['machine']['cpus']}-core machine (f32 matmul peak "
          f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s): install "
          f"{minutes(results['install_seconds'])}, training {minutes(results['train_wall_seconds'])} "
          f"at {results['steps_per_sec']:.1f} steps/s, final gap "
          f"{results['gap_bits_per_token']:+.3f} bits per token")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=str(RESULTS))
  parser.add_argument("--runs", type=int, default=1, help="Training runs (the median is quoted).")
  args = parser.parse_args()
  results = measure(args.runs)
  text = json.dumps(results, indent=2)
  print(text)
  pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.output).write_text(text + "\n")
  print(readme_figures(results), file=sys.stderr)


if __name__ == "__main__":
  main()
