"""The order-1 chain that grid_kl.py and options_kl.py sample with its exact posterior,
the exact laws of the samplers' outputs on it, and the sampler options measured.

V = 4 symbols, Dirichlet(1) rows, seed 0, started at its stationary law, on
L = 6 positions; a sampler's state is one of the (V + 1)^L sequences of
values and masks (mask id V), linear schedule, uniform grid. Also what the
option benchmarks share: their candidates, rows, report and the quick-start
checkpoint. `Chain.law`
propagates the law of a sampler's state exactly as its code runs: ordered
unmasking draws x_hat at every masked position of the current block and
reveals the k of highest score, summed over the V^m joint draws
(confidence: the top k, exact ties (the stationary start's) broken uniformly;
maskgit: log p + g Gumbel, whose top k is Plackett-Luce sampling without
replacement with weights p^(1/g); random: a uniform k-subset), and every
position with p(x_hat) >= threshold; ReMDM reveals and remasks each position
independently at `remdm.remdm_schedule`'s rates, its last step filling what
is still masked with the most likely value. Also what the option
benchmarks share: their candidates, rows and report, and the quick-start
checkpoint (grid_quickstart.py's too).
"""

import functools
import itertools
import json
import math
import sys
from typing import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import sparse

from md4 import restored
from md4 import samplers
from md4 import schedule as schedule_lib
from md4 import train
from md4.data import synthetic
from md4.samplers import engine
from md4.samplers import ordered
from md4.samplers import remdm

VOCAB, LENGTH, MASK = 4, 6, 4
SCHEDULE = schedule_lib.get("linear")
POWERS = (VOCAB + 1)**np.arange(LENGTH - 1, -1, -1)  # A state's index: state @ POWERS.


def chain_law() -> tuple[np.ndarray, np.ndarray]:
  """(sequences int [V^L, L], their probabilities [V^L]) of the chain."""
  chain = synthetic.MarkovChain(VOCAB, 1, 1.0, 0)
  x = np.array(list(itertools.product(range(VOCAB), repeat=LENGTH)))
  log_p = chain.known_source().log_prob(x)
  return x, np.exp(log_p)


def state_posteriors(x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(every sampler state [S, L], S = (V + 1)^L in product order, value V the mask;
  each position's law given the state's revealed values [S, L, V])."""
  states = np.array(list(itertools.product(range(VOCAB + 1), repeat=LENGTH)))
  consistent = np.all((states[:, None, :] == x[None]) | (states[:, None, :] == VOCAB), axis=-1)
  joint = consistent * p[None]  # [S, V^L]
  onehot = (x[:, :, None] == np.arange(VOCAB)).reshape(len(x), -1)  # [V^L, L V]
  posterior = (joint @ onehot).reshape(len(states), LENGTH, VOCAB)
  return states, posterior / posterior.sum(axis=-1, keepdims=True)


# (sampler, option, values): each option alone, the others at their defaults; the quick-start
# model's values are fewer (its runs are the expensive part), and block sizes of the exact
# chain's 6 positions and the quick-start model's 64 differ.
CANDIDATES = (
    ("maskgit", "temperature", {"exact": (0.5, 0.8, 1.0), "quickstart": (0.5, 1.0)}),
    ("maskgit", "choice_temperature",
     {"exact": (0.0, 1.0, 2.0, 4.5, 8.0), "quickstart": (1.0, 4.5, 8.0)}),
    ("maskgit", "threshold", {"exact": (0.0, 0.5, 0.9), "quickstart": ()}),
    ("llada", "temperature", {"exact": (0.5, 0.8, 1.0), "quickstart": (0.5, 1.0)}),
    ("llada", "threshold", {"exact": (0.0, 0.5, 0.9), "quickstart": (0.0, 0.9)}),
    ("blocks", "order", ("confidence", "maskgit", "random")),
    ("blocks", "block_size", {"exact": (3, 6), "quickstart": (8, 16, 32)}),
    ("remdm", "eta", {"exact": (0.0, 0.01, 0.02, 0.04, 0.1), "quickstart": (0.0, 0.04)}),
    ("remdm", "strategy", ("cap", "rescale", "loop")),
)


@functools.cache
def joint_draws(num: int) -> np.ndarray:
  """Every joint value of num positions [V^num, num]."""
  return np.array(list(itertools.product(range(VOCAB), repeat=num)), np.int64).reshape(
      VOCAB**num, num)


@functools.cache
def subset_bits(num: int) -> np.ndarray:
  """bool [2^num, num]: subset b holds position i where bit i of b is set."""
  return (np.arange(2**num)[:, None] >> np.arange(num)) & 1 == 1


def subset_probs(log_p: np.ndarray, count: int, order: str, noise: float) -> np.ndarray:
  """P(the count positions revealed are subset b | the draws) [N, 2^m] from log p(x_hat) [N, m]."""
  num, m = log_p.shape
  bits = subset_bits(m)
  probs = np.zeros((num, 2**m))
  if count <= 0 or count >= m:
    probs[:, 0 if count <= 0 else -1] = 1.0
  elif order == "random":
    probs[:, bits.sum(axis=1) == count] = 1.0 / math.comb(m, count)
  elif order == "confidence" or noise == 0.0:
    # The count-th highest score; positions tied with it (to 1e-9) are chosen uniformly.
    boundary = -np.sort(-log_p, axis=1)[:, count - 1:count]
    tied = np.isclose(log_p, boundary, rtol=0.0, atol=1e-9)
    above = (log_p > boundary) & ~tied
    needed = count - above.sum(axis=1)
    valid = (np.all(bits[None] >= above[:, None], axis=-1)
             & np.all(bits[None] <= (above | tied)[:, None], axis=-1)
             & ((bits[None] & tied[:, None]).sum(axis=-1) == needed[:, None]))
    ways = np.array([math.comb(t, k) for t, k in zip(tied.sum(axis=1), needed)])
    probs[valid] = np.broadcast_to(1.0 / ways[:, None], valid.shape)[valid]
  else:  # Gumbel top-k: first picks in Plackett-Luce order, summed over orders by subset.
    weights = np.exp((log_p - log_p.max(axis=1, keepdims=True)) / noise)
    total = weights.sum(axis=1)
    first = np.zeros((num, 2**m))
    first[:, 0] = 1.0
    for subset in range(1, 2**m):
      for i in np.flatnonzero(bits[subset]):
        rest = subset & ~(1 << i)
        first[:, subset] += first[:, rest] * weights[:, i] / (total - weights[:, bits[rest]].sum(1))
    size = bits.sum(axis=1) == count
    probs[:, size] = first[:, size]
  return probs


class Chain:
  """The chain's exact posterior over its (V + 1)^L sampler states, and samplers' laws."""

  def __init__(self, law: tuple[np.ndarray, np.ndarray] | None = None):
    """law: (sequences [V^L, L], probabilities [V^L]); the chain's by default, another (the
    chain started off its stationary law, where nothing ties) to check these laws by drawing."""
    self.x, self.p = law or chain_law()
    self.states, self.posterior = state_posteriors(self.x, self.p)
    self.all_masked = len(self.states) - 1

  def kl(self, state_law: np.ndarray) -> float:
    """KL per token of the law of fully revealed states [S] from the chain."""
    revealed = np.all(self.states != MASK, axis=1)
    q = np.zeros(VOCAB**LENGTH)
    q[self.states[revealed] @ (VOCAB**np.arange(LENGTH - 1, -1, -1))] = state_law[revealed]
    drawn = q > 0
    return float(np.sum(q[drawn] * np.log(q[drawn] / self.p[drawn]))) / LENGTH

  def ordered_moves(self, state: int, eligible: np.ndarray, count: int, order: str,
                    temperature: float, noise: float, threshold: float):
    """(targets, probabilities) of one ordered-unmasking step from state."""
    if not len(eligible):
      return np.array([state]), np.array([1.0])
    posterior = self.posterior[state, eligible]  # [m, V]
    draws = joint_draws(len(eligible))
    if temperature == 0:
      tempered = np.eye(VOCAB)[posterior.argmax(axis=1)]
    else:
      tempered = posterior**(1 / temperature)
      tempered /= tempered.sum(axis=1, keepdims=True)
    columns = np.arange(len(eligible))
    draw_prob = np.prod(tempered[columns, draws], axis=1)
    keep = draw_prob > 0
    draws, draw_prob = draws[keep], draw_prob[keep]
    p_hat = posterior[columns, draws]
    with np.errstate(divide="ignore"):
      probs = subset_probs(np.log(p_hat), count, order, noise)
    chosen = subset_bits(len(eligible))[None] | (threshold > 0) * (p_hat >= threshold)[:, None]
    step = (draws - MASK) * POWERS[eligible]  # [N, m]
    targets = state + np.sum(chosen * step[:, None], axis=-1)
    return targets.reshape(-1), (draw_prob[:, None] * probs).reshape(-1)

  def ordered_law(self, steps: int, *, order: str, temperature: float, choice_temperature: float,
                  threshold: float, block_size: int) -> np.ndarray:
    """The law [S] of ordered unmasking's output (`ordered.run`, uniform grid)."""
    num_blocks = ordered.check_ordered_args(order, temperature, choice_temperature, threshold,
                                            block_size, steps, LENGTH)
    if threshold > 0 and num_blocks > 1:
      raise ValueError("a threshold lets rows' blocks end apart: one block only")
    block_steps = steps // num_blocks
    block_of = np.arange(LENGTH) // (block_size or LENGTH)
    block_sizes = np.bincount(block_of).astype(np.float32)
    times = engine.time_grid(block_steps, "uniform")
    kept = np.array(jnp.asarray(SCHEDULE.mask_prob(times[1:]) / SCHEDULE.mask_prob(times[0])))
    kept[-1] = 0.0
    masked = self.states == MASK
    block = np.min(np.where(masked, block_of, num_blocks), axis=1)
    law = np.zeros(len(self.states))
    law[self.all_masked] = 1.0
    eligible = masked & (block_of[None] == block[:, None])  # The current block's masked positions.
    moves, unchanged_key = {}, None  # key -> (sources, targets, probabilities, covered [S])
    for j in range(steps):
      block_step = j % block_steps
      keeps = np.floor(block_sizes * kept[block_step])
      noise = choice_temperature * (1.0 - np.float32(block_step + 1) / block_steps)
      support = np.flatnonzero(law)
      counts = eligible.sum(axis=1) - keeps[np.minimum(block, num_blocks - 1)]
      key = (tuple(keeps), noise if order == "maskgit" and np.any(counts[support] > 0) else None)
      if key == unchanged_key or (threshold == 0 and not np.any(counts[support] > 0)):
        continue
      sources, targets, probs, covered = moves.get(
          key, (np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.zeros(len(law), bool)))
      new_moves = [(state, *self.ordered_moves(state, np.flatnonzero(eligible[state]),
                                               int(counts[state]), order, temperature, noise,
                                               threshold))
                   for state in support[~covered[support]]]
      covered[support] = True
      moves[key] = (np.concatenate([sources] + [np.full(len(t), s) for s, t, _ in new_moves]),
                    np.concatenate([targets] + [t for _, t, _ in new_moves]),
                    np.concatenate([probs] + [p for _, _, p in new_moves]), covered)
      sources, targets, probs, _ = moves[key]
      weights = probs * law[sources]
      if not np.any((targets != sources) & (weights > 0)):
        unchanged_key = key  # Every later step of this key changes nothing either.
        continue
      law, unchanged_key = np.bincount(targets, weights, minlength=len(law)), None
    return law

  @functools.cached_property
  def remdm_moves(self) -> dict[tuple[int, int, int], sparse.csr_matrix]:
    """ReMDM's step as sparse matrices [S, S] of the revealed values' posterior probability,
    one per (masked, revealed of them, remasked) count."""
    entries = {}
    for pattern in subset_bits(LENGTH):
      m = int(pattern.sum())
      sources = np.flatnonzero(np.all((self.states == MASK) == pattern, axis=1))
      # Each position's outcome: masked, a value or MASK (stays); revealed, 1 if remasked.
      outcomes = np.array(list(itertools.product(
          *[range(VOCAB + 1) if is_masked else (0, 1) for is_masked in pattern])),
                          np.int64).reshape(-1, LENGTH)
      old = self.states[sources][:, None]  # [n, 1, L]
      new = np.where(pattern, outcomes[None], np.where(outcomes[None] == 1, MASK, old))
      revealed = pattern & (outcomes != MASK)  # [O, L]
      value_prob = np.take_along_axis(self.posterior[sources][:, None],
                                      np.where(revealed, outcomes, 0)[None, ..., None],
                                      axis=-1)[..., 0]
      prob = np.prod(np.where(revealed[None], value_prob, 1.0), axis=-1)  # [n, O]
      num_revealed, num_remasked = revealed.sum(axis=1), (~pattern & (outcomes == 1)).sum(axis=1)
      for a, c in set(zip(num_revealed, num_remasked)):
        group = (num_revealed == a) & (num_remasked == c)
        entries.setdefault((m, int(a), int(c)), []).append(
            ((new[:, group] @ POWERS).ravel(), np.repeat(sources, group.sum()),
             prob[:, group].ravel()))
    size = len(self.states)
    return {group: sparse.csr_matrix(
        (np.concatenate([e[2] for e in parts]),
         (np.concatenate([e[0] for e in parts]), np.concatenate([e[1] for e in parts]))),
        shape=(size, size)) for group, parts in entries.items()}

  def remdm_law(self, steps: int, *, strategy: str, eta: float, t_on: float, t_off: float,
                alpha_on: float) -> np.ndarray:
    """The law [S] of ReMDM's output (`remdm.run`, uniform grid)."""
    alpha_t, alpha_s, sigma, _ = remdm.remdm_schedule(SCHEDULE, steps, "uniform", strategy, eta,
                                                      t_on, t_off, alpha_on)
    reveal = np.clip((alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t), 0.0, 1.0)
    law = np.zeros(len(self.states))
    law[self.all_masked] = 1.0
    for r, s in zip(reveal[:-1], sigma[:-1]):
      law = sum((r**a * (1 - r)**(m - a) * s**c * (1 - s)**(LENGTH - m - c)) * (moves @ law)
                for (m, a, c), moves in self.remdm_moves.items())
    # Last step: a revealed position keeps its value (remasked, it takes the oracle's most
    # likely value there: its own); a masked one its draw if revealed, else the most likely value.
    final = np.zeros(len(self.states))
    masked = self.states == MASK
    best = self.posterior.argmax(axis=-1)
    for state in np.flatnonzero(law):
      where = np.flatnonzero(masked[state])
      mix = reveal[-1] * self.posterior[state, where] + (1 - reveal[-1]) * np.eye(VOCAB)[
          best[state, where]]
      draws = joint_draws(len(where))
      final_states = state + (draws - MASK) @ POWERS[where]
      final += np.bincount(final_states, law[state] * np.prod(mix[np.arange(len(where)), draws],
                                                               axis=1), minlength=len(final))
    return final

  def law(self, sampler: str, steps: int, options: dict) -> np.ndarray:
    """The law [S] of the output of sampler (remdm or ordered unmasking) with options."""
    if sampler == "remdm":
      return self.remdm_law(steps, **options)
    fixed = getattr(samplers.get(sampler).run, "keywords", {})  # maskgit's and llada's order.
    return self.ordered_law(steps, **fixed, **options)


def defaults() -> dict[str, dict]:
  """The registered defaults the candidates vary around, by sampler."""
  return {sampler: dict(samplers.get(sampler).options) for sampler, _, _ in CANDIDATES}


def measured(stage: str, steps: Callable[[str], tuple[int, ...]],
             measure: Callable[[str, dict, int], dict]) -> list[dict]:
  """One row per candidate of stage ('exact', 'quickstart') at each of steps(sampler), printed
  as it comes: measure(sampler, options, steps), once per distinct sampler, options and steps
  (the defaults recur across options)."""
  rows, done = [], {}
  for sampler, option, values in CANDIDATES:
    for value in values[stage] if isinstance(values, dict) else values:
      options = samplers.options(sampler, {option: value})
      for num_steps in steps(sampler):
        key = (sampler, tuple(sorted(options.items())), num_steps)
        if key not in done:
          done[key] = measure(sampler, options, num_steps)
        rows.append({"sampler": sampler, "option": option, "value": value, "steps": num_steps,
                     **done[key]})
        print(json.dumps(rows[-1]), flush=True)
  return rows


def report(rows: list[dict], cell: Callable[[dict], str], output: str | None, **fields) -> None:
  """Prints rows as a table of cell(row) by option value and steps; writes the JSON to output
  (the command, fields, the defaults measured around and the rows) when given."""
  steps = sorted({row["steps"] for row in rows})
  print("\n| sampler | option | value | " + " | ".join(f"T = {t}" for t in steps) + " |")
  print("| --- | --- | --- |" + " --- |" * len(steps))
  for key, group in itertools.groupby(rows, lambda r: (r["sampler"], r["option"], r["value"])):
    by_steps = {row["steps"]: cell(row) for row in group}
    print(f"| {' | '.join(map(str, key))} | "
          + " | ".join(by_steps.get(t, "–") for t in steps) + " |")
  if output:
    with open(output, "w") as f:
      json.dump({"command": " ".join(["python"] + sys.argv), **fields, "defaults": defaults(),
                 "rows": rows}, f, indent=1)


def quickstart_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> restored.Checkpoint:
  """The checkpoint in workdir, trained there from config first if there is none."""
  try:
    return restored.restore(workdir)
  except (ValueError, FileNotFoundError):
    train.train_and_evaluate(config, workdir)
    return restored.restore(workdir)
