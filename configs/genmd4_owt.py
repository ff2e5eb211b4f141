"""GenMD4 on OpenWebText: the MD4-S setup of owt.py with a learned schedule.

Follows google-deepmind/md4's md4/configs/genmd4/openwebtext.py with the
values its launcher runs by default (its `sweep()`): lr 3e-4, dropout 0.02,
weight decay 0.03, as owt.py. A learned polynomial schedule per token value
with the `config.genmd4` defaults, as genmd4_text8.py: exponents initialised
at 1 (the linear schedule), t_1 = 1e-3, two masked copies per sequence for
the REINFORCE leave-one-out gradient. Parameters at 50257 tokens:
165,907,601, MD4-S's 165,857,344 and one schedule exponent per token (50257);
the reference's file sets 50259 tokens, which gives it 165,910,675. The data
and the prepared folder are owt.py's (GPT-2's tokens); prepare them once with
`python -m md4.data.prepare --config=configs/genmd4_owt.py`.

Slice: a v5litepod-8 (8 v5e chips, data parallel), checked without a TPU by
`md4-compile --config=configs/genmd4_owt.py --topology=v5litepod-8` with
owt.py's settings (logits 128 positions at a time, blocks recomputed): the
train step (two masked copies per sequence) peaks at 14.31 GiB per chip of
16 GiB (10% to spare); estimated 1.39 s per step (HBM-bound roofline, MFU
0.31). The eval step (4 times per sequence, two copies each) peaks at 15.14
GiB, 5% to spare: on this slice lower --config.eval_num_t.
"""

from md4.configs import owt


def get_config():
  config = owt.get_config()
  config.model_type = "genmd4"
  return config
