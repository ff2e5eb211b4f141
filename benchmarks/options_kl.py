"""Exact KL of each sampler option's sample law from an order-1 chain.

python benchmarks/options_kl.py --output=benchmarks/results/options_kl.json

Every option of maskgit, llada, blocks and remdm in
`oracle_chain.CANDIDATES` is varied alone, the others at their registered
defaults: the exact law of the sampler's output with the chain's exact
posterior as the network (`oracle_chain.Chain.law`), its KL from the chain
in nats per token, at steps 2 to 1024 (from 6 steps on, ordered unmasking
reveals the chain's 6 positions one at a time).
"""

from absl import app
from absl import flags

import oracle_chain

_OUTPUT = flags.DEFINE_string("output", None, "Also writes the JSON there.")
STEPS = (2, 4, 8, 32, 128, 1024)


def main(argv):
  del argv
  chain = oracle_chain.Chain()
  rows = oracle_chain.measured("exact", lambda sampler: STEPS, lambda sampler, options, steps: {
      "kl_nats_per_token": chain.kl(chain.law(sampler, steps, options))})
  oracle_chain.report(rows, lambda row: f"{row['kl_nats_per_token']:.2e}", _OUTPUT.value,
                      vocab=oracle_chain.VOCAB, length=oracle_chain.LENGTH)


if __name__ == "__main__":
  app.run(main)
