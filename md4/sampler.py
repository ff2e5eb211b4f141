"""MD4's ancestral sampler as one call (the stable `sampler.ancestral`).

Every sampler lives in `md4.samplers` (its registry, `engine` and one module
per sampler); this module keeps the call that returns the tokens alone, e.g.

    fn = jax.jit(lambda rng: sampler.ancestral(predict_fn, rng, shape=(B, L),
                                               vocab_size=V, schedule=sch,
                                               steps=T))
"""

import jax.numpy as jnp

from md4 import checks
from md4 import diffusion
from md4 import samplers
from md4 import schedule as schedule_lib
from md4.samplers import engine

Array = jnp.ndarray

GRIDS = engine.GRIDS
time_grid = engine.time_grid
top_p_log_probs = engine.top_p_log_probs


def ancestral(predict_fn: checks.PredictFn,
              rng: Array,
              *,
              shape: tuple[int, ...],
              vocab_size: int,
              schedule: schedule_lib.Schedule,
              steps: int,
              grid: str = engine.DEFAULT_GRID,
              top_p: float | None = None,
              prefix: Array | None = None,
              infill: tuple[Array, Array] | None = None,
              reuse_outputs: bool = False) -> Array:
  """Samples z int32 [B, ...] = `shape` in {0..V-1}, no mask id left.

  Args:
    predict_fn: (z [B, ...] int32 with mask id V, t [B] float32) -> logits
      [B, ..., V]. Every dim of `shape` after B is a position.
    rng: a PRNG key.
    shape: (B, L) for text, (B, H, W, C) for images, ...
    vocab_size: V; the mask id is V.
    schedule: the masking schedule the model was trained with.
    steps: T, the number of network steps.
    grid: "uniform" or "cosine" time grid (`md4.samplers.engine`).
    top_p: draw from the renormalised top-p nucleus (see `top_p_log_probs`);
      None or 1.0 draws from the full softmax.
    prefix: int32 [B, P]; the first P positions (row-major over the dims
      after B) are given and never change.
    infill: (template int32 [B, ...], given bool [B, ...]); positions where
      `given` is True hold `template` from the start and never change
      (template values elsewhere are ignored). Where prefix and infill both
      give a position, the prefix wins.
    reuse_outputs: skip the network in a step when no position changed since
      its last call, reusing those logits. Only for a network that ignores
      t: one whose output t can reach is refused. The skip is decided for the
      whole batch at once.

  `md4.samplers.sample("ancestral", ...)` also gives the network evaluations
  spent and snapshots of the reverse process.
  """
  return samplers.sample("ancestral", predict_fn, rng, diffusion.Tokens(vocab_size, schedule),
                         shape=shape, steps=steps, grid=grid, top_p=top_p, prefix=prefix,
                         infill=infill, reuse_outputs=reuse_outputs).tokens
