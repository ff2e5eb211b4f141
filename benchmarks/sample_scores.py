"""Bias and coverage of md4.sample_quality's entropy-rate and KL estimates, before and after.

python benchmarks/sample_scores.py --repeats=200 --output=benchmarks/results/sample_scores.json

For 27-symbol Markov chains of order 1 and 2, sparse (concentration 0.1)
and dense (1.0), draws --repeats seeded sets of N x 64 samples of the chain
itself (N = 256 and 1024) and scores each against the chain: the truth is
the chain's entropy rate and a KL of 0. Prints, per estimator, the bias of
the mean (bits per token), the spread across repeats, the mean standard
error and the share of +-1.96 SE intervals that cover the truth. "before"
is the estimator md4 had until issue 27 (Chao-Shen coverage-adjusted
entropy, bootstrap errors over 200 resampled sequence sets), rewritten here;
"after" is `md4.sample_quality.known_source_scores`.
"""

import json
import math
import sys

from absl import app
from absl import flags
import numpy as np

from md4 import sample_quality
from md4.data import synthetic

_REPEATS = flags.DEFINE_integer("repeats", 200, "Seeded sample sets per source and size.")
_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there.")
BITS = 1.0 / math.log(2.0)
LENGTH = 64


def chao_shen_entropy(counts: np.ndarray) -> np.ndarray:
  """Chao-Shen entropy in nats per row [S] of counts [S, A]."""
  n = counts.sum(axis=1, keepdims=True)
  singletons = np.sum(counts == 1, axis=1, keepdims=True)
  singletons = np.where(singletons == n, n - 1, singletons)
  coverage = 1.0 - singletons / np.maximum(n, 1)
  seen = counts > 0
  p = np.where(seen, coverage * counts / np.maximum(n, 1), 1.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(seen, -p * np.log(p) / (1.0 - (1.0 - p)**n), 0.0).sum(axis=1)


def before_scores(tokens: np.ndarray, source, seed: int) -> dict[str, float]:
  """The estimator before issue 27: Chao-Shen entropy rate, KL = plug-in cross entropy minus
  it, bootstrap standard errors over 200 resampled sets of sequences; bits per token."""
  num = len(tokens)
  contexts, symbols = source.events(tokens)
  cells = (contexts * source.table.shape[1] + symbols).reshape(num, -1)

  def estimates(weights: np.ndarray) -> tuple[float, float]:
    counts = np.bincount(cells.reshape(-1), np.repeat(weights, cells.shape[1]),
                         source.table.size).reshape(source.table.shape)
    entropy = counts.sum(axis=1) @ chao_shen_entropy(counts) / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
      cross = -np.sum(np.where(counts > 0, counts * np.log(source.table), 0.0)) / counts.sum()
    return entropy, cross - entropy

  rng = np.random.default_rng(seed)
  entropy, kl = estimates(np.ones(num))
  replicates = np.array([estimates(rng.multinomial(num, np.full(num, 1.0 / num)).astype(float))
                         for _ in range(200)])
  return {"entropy_rate": entropy * BITS, "entropy_rate_stderr": replicates[:, 0].std(ddof=1) * BITS,
          "kl": kl * BITS, "kl_stderr": replicates[:, 1].std(ddof=1) * BITS}


def summary(results: list[dict[str, float]], name: str, truth: float) -> dict[str, float]:
  values = np.array([result[name] for result in results])
  stderrs = np.array([result[name + "_stderr"] for result in results])
  return {"bias": float(values.mean() - truth), "spread": float(values.std(ddof=1)),
          "mean_stderr": float(stderrs.mean()),
          "coverage": float(np.mean(np.abs(values - truth) < 1.96 * stderrs))}


def main(argv):
  del argv
  rows = []
  for order in (1, 2):
    for concentration in (0.1, 1.0):
      chain = synthetic.MarkovChain(27, order, concentration, 0)
      source = chain.known_source()
      truths = {"entropy_rate": chain.entropy_rate() * BITS, "kl": 0.0}
      for num in (256, 1024):
        rngs = [np.random.default_rng((num, repeat, row)) for repeat in range(_REPEATS.value)
                for row in range(num)]
        tokens = chain.sample_batch(rngs, LENGTH).reshape(_REPEATS.value, num, LENGTH)
        for estimator, score in (("before", before_scores),
                                 ("after", lambda x, s, seed: sample_quality.known_source_scores(
                                     x, s, 0.0, seed))):
          results = [score(tokens[repeat], source, repeat) for repeat in range(_REPEATS.value)]
          for name, truth in truths.items():
            row = {"order": order, "concentration": concentration, "samples": f"{num}x{LENGTH}",
                   "estimator": estimator, "score": name, **summary(results, name, truth)}
            rows.append(row)
            print(json.dumps(row), flush=True)
  print("\n| order | conc. | samples | score | before: bias / spread / SE / coverage "
        "| after: bias / spread / SE / coverage |\n| --- | --- | --- | --- | --- | --- |")
  for before, after in zip(rows[0::4] + rows[1::4], rows[2::4] + rows[3::4]):
    cells = [" / ".join(f"{row[key]:+.4f}" if key == "bias" else f"{row[key]:.4f}" if key != "coverage"
                        else f"{row[key]:.2f}" for key in ("bias", "spread", "mean_stderr", "coverage"))
             for row in (before, after)]
    print(f"| {before['order']} | {before['concentration']} | {before['samples']} | "
          f"{before['score']} | {cells[0]} | {cells[1]} |")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"command": " ".join(["python"] + sys.argv), "repeats": _REPEATS.value,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
