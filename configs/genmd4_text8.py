"""GenMD4 on text8 (Shi et al., 2024, section 6 and its text8 experiments).

Follows google-deepmind/md4's md4/configs/genmd4/text8.py with the values its
launcher runs by default (its `sweep()`): lr 3e-4, dropout 0.05, weight decay
0.03. The MD4-S text8 setup of text8.py otherwise, network included, with a
learned polynomial schedule per token value: exponents initialised at 1 (the
linear schedule), t_1 = 1e-3, two masked copies per sequence for the
REINFORCE leave-one-out gradient. Parameters: 88,734,299, the reference's
88,734,299: MD4-S's 88,734,272 and one schedule exponent per character (27).

Slice: a v5litepod-8, checked without a TPU by
`md4-compile --config=configs/genmd4_text8.py --topology=v5litepod-8`: the
train step (two masked copies per sequence) peaks at 9.93 GiB per chip of
16 GiB (38% to spare), the eval step at 4.03 GiB; estimated 0.30 s per step
(HBM-bound roofline, MFU 0.30). It fits because the blocks keep only their
matmul outputs for the backward pass (model.remat_policy="dots"): storing
every activation of both copies peaks at 14.71 GiB (8% to spare). The
logits, [64, 256, 128] float32 per copy and chip, need no chunking.
"""

from md4.configs import text8


def get_config():
  config = text8.get_config()
  config.model_type = "genmd4"
  config.genmd4.init_power = 1.0
  config.genmd4.t1 = 1e-3
  config.genmd4.single_sample = False
  config.optimizer.learning_rate = 3e-4
  # Two network passes per sequence: recompute all but the matmuls to keep 10% of a v5e's HBM.
  config.model.remat_policy = "dots"
  return config
