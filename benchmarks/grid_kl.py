"""Exact KL of the ancestral sampler's sample law from an order-1 chain, by time grid.

python benchmarks/grid_kl.py --output=benchmarks/results/grid_kl.json

An order-1 Markov chain over V = 4 symbols (Dirichlet(1) rows, seed 0,
started at its stationary law) on L = 6 positions, sampled by md4's
ancestral step with the exact posterior as the network: each masked
position is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)
to a draw from its exact conditional law given the revealed positions, and
positions still masked after the last step take their most likely value.
The law of the sampler's state is propagated exactly over all (V + 1)^L
states, so the KL of the sample law from the chain, per token, is exact (in
float64 arithmetic, on md4's float32 times `sampler.time_grid`). One row per
schedule (linear, cosine), grid (uniform, cosine) and steps 8 to 1024.
"""

import itertools
import json
import sys

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import oracle_chain
from md4 import sampler
from md4 import schedule as schedule_lib

_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there.")
VOCAB, LENGTH = oracle_chain.VOCAB, oracle_chain.LENGTH
STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)


def transitions(x: np.ndarray, p: np.ndarray):
  """The sampler's moves between states (value or mask id V per position).

  Returns (states [S, L], source, target, number staying masked, number
  revealed, product of the revealed values' posterior probabilities) over
  every pair of states one step can join, and each state's final sequence
  index (masked positions at their most likely value).
  """
  mask = VOCAB
  states, posterior = oracle_chain.state_posteriors(x, p)
  index = {tuple(state): i for i, state in enumerate(states)}
  source, target, stay, reveal, prob = [], [], [], [], []
  for i, state in enumerate(states):
    masked = np.flatnonzero(state == mask)
    for choice in itertools.product(range(VOCAB + 1), repeat=len(masked)):
      new = state.copy()
      new[masked] = choice
      revealed = [(position, value) for position, value in zip(masked, choice) if value != mask]
      source.append(i)
      target.append(index[tuple(new)])
      stay.append(len(masked) - len(revealed))
      reveal.append(len(revealed))
      prob.append(np.prod([posterior[i, position, value] for position, value in revealed]))
  final = np.where(states == mask, posterior.argmax(axis=-1), states)
  final_index = final @ (VOCAB ** np.arange(LENGTH - 1, -1, -1))
  return (states, np.array(source), np.array(target), np.array(stay), np.array(reveal),
          np.array(prob), final_index)


def sample_law(moves, sch: schedule_lib.Schedule, steps: int, grid: str) -> np.ndarray:
  """The law [V^L] of the sampler's output."""
  states, source, target, stay, reveal, prob, final_index = moves
  times = sampler.time_grid(steps, grid)
  alpha = np.asarray(sch.alpha(jnp.asarray(times)), np.float64)
  law = np.zeros(len(states))
  law[-1] = 1.0  # All masked: the last state of the product order.
  for step in range(steps):
    alpha_t, alpha_s = alpha[step], alpha[step + 1]
    rate = (alpha_s - alpha_t) / (1.0 - alpha_t)
    weights = (1.0 - rate)**stay * rate**reveal * prob
    law = np.bincount(target, weights * law[source], minlength=len(states))
  return np.bincount(final_index, law, minlength=VOCAB**LENGTH)


def main(argv):
  del argv
  x, p = oracle_chain.chain_law()
  moves = transitions(x, p)
  rows = []
  for schedule_name in ("linear", "cosine"):
    sch = schedule_lib.get(schedule_name)
    for grid in sampler.GRIDS:
      for steps in STEPS:
        q = sample_law(moves, sch, steps, grid)
        kl = float(np.sum(np.where(q > 0, q * np.log(q / p), 0.0))) / LENGTH
        rows.append({"schedule": schedule_name, "grid": grid, "steps": steps,
                     "kl_nats_per_token": kl})
        print(json.dumps(rows[-1]), flush=True)
  print("\n| schedule | grid | " + " | ".join(f"T = {steps}" for steps in STEPS) + " |")
  print("| --- | --- |" + " --- |" * len(STEPS))
  for start in range(0, len(rows), len(STEPS)):
    block = rows[start:start + len(STEPS)]
    print(f"| {block[0]['schedule']} | {block[0]['grid']} | "
          + " | ".join(f"{row['kl_nats_per_token']:.2e}" for row in block) + " |")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"command": " ".join(["python"] + sys.argv), "vocab": VOCAB, "length": LENGTH,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
