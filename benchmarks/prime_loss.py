"""Loss-head cost of MDM-Prime against MD4, forward + backward, as JSON lines.

python benchmarks/prime_loss.py --num_classes=50257 --lengths=2,3,16

Times the gradient w.r.t. the logits [B, L, C] of the masked NLL alone (no
network): MD4's `diffusion.token_log_prob`, Prime's `sub_token_log_prob` (the
path it picks for the codec) and Prime's per-slot path, at the same masking
rate, interleaved in one process so that a shared machine's load hits all
alike.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from md4 import diffusion
from md4 import prime
import timing

# The two paths `prime.sub_token_log_prob` chooses between.
per_slot_log_prob = prime._per_slot_log_prob  # pylint: disable=protected-access
gathers_agreement_sets = prime._gathers_agreement_sets  # pylint: disable=protected-access

_NUM_CLASSES = flags.DEFINE_integer("num_classes", 50257, "C.")
_LENGTHS = flags.DEFINE_list("lengths", ["2", "3"], "Sub-token lengths l (16 = binary "
                             "for C = 50257).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "L.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per function (best is kept).")
_MASK_RATE = flags.DEFINE_float("mask_rate", 0.5, "Fraction of masked (sub-)tokens.")


def best_seconds(fn, *args) -> float:
  """Fastest of `repeats` calls of a compiled fn, after a warm-up call."""
  return min(timing.call_seconds(fn, *args, repeats=_REPEATS.value))


def masked_nll_grad(log_prob_fn):
  """jit of d/dlogits sum over masked entries of -log_prob_fn(logits)."""
  return jax.jit(jax.grad(lambda logits, masked: -jnp.where(
      masked, log_prob_fn(logits), 0.0).sum()))


def main(argv):
  del argv
  num_classes, shape = _NUM_CLASSES.value, (_BATCH.value, _SEQ_LEN.value)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=shape + (num_classes,)), jnp.float32)
  x = jnp.asarray(rng.integers(0, num_classes, shape), jnp.int32)
  md4_grad = masked_nll_grad(lambda logits: diffusion.token_log_prob(logits, x))
  md4_masked = jnp.asarray(rng.random(shape) < _MASK_RATE.value)
  md4_seconds = best_seconds(md4_grad, logits, md4_masked)
  for length in map(int, _LENGTHS.value):
    codec = prime.Codec(num_classes, length, shuffle_seed=0)
    y_0 = codec.encode(x)
    masked = jnp.asarray(rng.random(y_0.shape) < _MASK_RATE.value)
    y_t = jnp.where(masked, codec.mask_id, y_0)
    current = masked_nll_grad(lambda logits: prime.sub_token_log_prob(
        logits, y_t, y_0, codec))
    per_slot = masked_nll_grad(lambda logits: per_slot_log_prob(logits, y_t, y_0, codec))
    seconds = best_seconds(current, logits, masked)
    per_slot_seconds = best_seconds(per_slot, logits, masked)
    print(json.dumps({
        "num_classes": num_classes, "length": length, "base": codec.base,
        "agreement_path": gathers_agreement_sets(codec),
        "md4_seconds": md4_seconds, "prime_seconds": seconds,
        "per_slot_seconds": per_slot_seconds, "prime_over_md4": seconds / md4_seconds,
        "per_slot_over_md4": per_slot_seconds / md4_seconds}))


if __name__ == "__main__":
  app.run(main)
