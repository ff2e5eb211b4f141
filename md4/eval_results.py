"""What `python -m md4.evaluate` writes and prints: the merged results file, the
summary lines and the zero-shot table."""

import json
from typing import Any

from etils import epath

from md4 import sample_quality

ZERO_SHOT = "zero_shot:"  # Prefix of the zero-shot sets' sections in results["nelbo"].


def zero_shot_table(nelbo: dict[str, dict[str, Any]]) -> list[str]:
  """The zero-shot sections of results["nelbo"] as the lines of a Markdown table."""
  sets = [section for name, section in nelbo.items() if name.startswith(ZERO_SHOT)]
  if not sets:
    return []
  lines = ["| Set | Sequences | Bits per token | Perplexity (bound) |",
           "| --- | ---: | ---: | ---: |"]
  for section in sets:
    lines.append(f"| {section['set']} | {section['num_sequences']} | "
                 f"{section['bits_per_token']:.4f} ± {section['bits_per_token_stderr']:.4f} | "
                 f"{section['perplexity']:.2f} ± {section['perplexity_stderr']:.2f} |")
  return lines


def write(out_dir: epath.Path, results: dict[str, Any]) -> epath.Path:
  """Merges results into out_dir/results_step_<N>.json: sections of this run replace old ones."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"results_step_{results['step']}.json"
  merged = {}
  if path.exists():
    try:
      merged = json.loads(path.read_text())
    except ValueError:
      pass  # Not JSON: overwritten below.
  nelbo = {**merged.get("nelbo", {}), **results["nelbo"]}
  merged.update({key: value for key, value in results.items() if key != "results_file"})
  merged["nelbo"] = nelbo
  path.write_text(json.dumps(merged, indent=2) + "\n")
  return path


def summary(results: dict[str, Any]) -> str:
  """Human-readable lines for the results of `run`."""
  lines = [f"{results['model_type']} on {results['dataset']}, step {results['step']} of "
           f"{results['workdir']}"]
  for name, section in results["nelbo"].items():
    unit = "dim" if "bits_per_dim" in section else "token"
    bits, stderr = section[f"bits_per_{unit}"], section[f"bits_per_{unit}_stderr"]
    line = (f"  NELBO on {name}: {bits:.4f} ± {stderr:.4f} bits per {unit} "
            f"({section['num_sequences']} sequences x {section['num_t']} times)")
    if "perplexity" in section:
      line += f"; perplexity <= {section['perplexity']:.2f}"
    entropy = section.get("data_entropy_bits_per_token")
    if entropy is not None:
      line += f"; source entropy {entropy:.4f} (gap {bits - entropy:+.4f})"
    lines.append(line)
  if "samples" in results:
    drawn = results["samples"]
    where = drawn["files"][0] if drawn["files"] else "(written by process 0)"
    lines.append(f"  {drawn['num_samples']} samples ({drawn['nfe']} network evaluations) "
                 f"from the {drawn['sampler']} sampler: {where}")
    if drawn.get("quality"):
      lines.append("  " + sample_quality.describe(drawn["quality"]))
  if "results_file" in results:
    lines.append(f"  results: {results['results_file']}")
  table = zero_shot_table(results["nelbo"])
  if table:
    lines.extend(["", *table])
  return "\n".join(lines)
