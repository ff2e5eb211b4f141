"""MDM-Prime on OpenWebText (Chao et al., 2025, section 4.1).

Model and optimiser follow chen-hao-chao/mdm-prime's text/ folder (MDLM-Prime):
its configs/model/small.yaml and configs/config.yaml. Network: its DiT
backbone, 12 layers of width 768, 12 heads, adaLN-zero from a 128-wide
conditioning vector that does not read t (its time_conditioning=False feeds
t = 0), GELU MLPs of hidden width 3072, rotary positions, dropout 0.1 on the
attention and MLP outputs; each position's l = 2 sub-tokens (base 225,
`--config.prime.binary=True`: 16 binary ones) embedded 384 wide and
concatenated. Parameters at 50257 tokens: 131,168,640 against the reference's
131,115,089 (+0.04%): here one sub-token table per slot (+86,784) and a
128 -> 512 -> 128 time MLP (+82,304, MD4's form; the reference's is
256 -> 128 -> 128), there LayerNorm scales (19,200), MLP biases (46,080) and an
output bias (50,257); the checkpoint also holds 36,096 zero output columns that
pad 50257 logits to 50304 and receive no gradient. Training, the reference's:
batch 512, AdamW (lr 3e-4, b2 0.999, no weight decay) at a constant rate after
2500 warm-up steps, gradient clipping at norm 1, EMA 0.9999, 1M steps, bf16
compute, linear schedule (its log-linear noise).

The data are owt.py's: GPT-2's 50257 tokens, MDLM's held-out split, the same
prepared folder. Prepare the corpus once with
`python -m md4.data.prepare --config=configs/owt_prime.py`.

Slice: a v5litepod-8 (8 v5e chips, data parallel), checked without a TPU by
`md4-compile --config=configs/owt_prime.py --topology=v5litepod-8`: the train
step peaks at 10.32 GiB per chip of 16 GiB (35% to spare), the eval step at
11.10 GiB; estimated 0.79 s per step (HBM-bound roofline, MFU 0.28). It
fits with owt.py's settings: the loss makes its float32 logits over the
50257 classes 128 positions at a time (config.loss_chunk_size; whole, they
are [64, 1024, 50304] per chip, 13 GB) and the blocks are recomputed in the
backward pass (model.remat_policy="full").
"""

import ml_collections

from md4.configs import owt


def set_mdm_prime_small(model: ml_collections.ConfigDict) -> None:
  """Sets config.model to MDM-Prime's (MDLM's) small DiT backbone."""
  model.width = 768
  model.num_layers = 12
  model.num_heads = 12
  model.mlp_type = "gelu"
  model.mlp_ratio = 4.0
  model.mlp_multiple_of = 1
  model.cond_dim = 128
  model.embed_dim = 0
  model.time_conditioning = "none"
  model.dropout_rate = 0.1
  model.channel_dropout = False


def get_config():
  config = owt.get_config()
  config.model_type = "prime"
  config.prime.length = 2
  config.prime.binary = False
  set_mdm_prime_small(config.model)
  config.optimizer.warmup_steps = 2500
  config.optimizer.min_lr_ratio = 1.0  # A constant rate after the warm-up.
  config.optimizer.weight_decay = 0.0
  return config
