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
train step (two masked copies per sequence) peaks at 14.71 GiB per chip of
16 GiB, only 8% to spare; the eval step at 4.03 GiB; estimated 0.32 s per
step (HBM-bound roofline, MFU 0.28).
"""

from md4.configs import text8


def get_config():
  config = text8.get_config()
  config.model_type = "genmd4"
  config.genmd4.init_power = 1.0
  config.genmd4.t1 = 1e-3
  config.genmd4.single_sample = False
  config.optimizer.learning_rate = 3e-4
  return config
