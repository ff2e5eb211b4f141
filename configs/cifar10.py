"""MD4 on CIFAR-10 pixels (Shi et al., 2024), as the reference runs it.

Follows google-deepmind/md4's md4/configs/md4/cifar10.py (its `sweep()` runs
the file's values, linear schedule and cosine sampling grid). Network, the
reference's: a VDM-style U-Net at full 32x32 resolution (no downsampling),
128 channels, 32 residual blocks down and 33 up, a middle
ResBlock-Attention-ResBlock, dropout 0.1, a 128-wide conditioning vector,
each pixel channel a 256-way token embedded 128 wide. Parameters:
28,427,520, the reference's 28,427,520. Training, the reference's: batch
256, AdamW with lr 2e-4, b2 0.99, weight decay 0.01, 100 warm-up steps and
cosine decay over 2M steps, EMA 0.9999, continuous time. Chosen here:
gradient clipping at norm 1 (the reference has none), random horizontal
flips (the reference has none). Class-conditional variant:
cifar10_conditional.py.

Slice: a v5litepod-8 (8 v5e chips, data parallel), checked without a TPU by
`md4-compile --config=configs/cifar10.py --topology=v5litepod-8`: the train
step peaks at 4.72 GiB per chip of 16 GiB (70% to spare), the eval step at
2.47 GiB; estimated 0.11 s per step (HBM-bound roofline, MFU 0.25).
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "cifar10"
  config.cifar10.random_flip = True
  config.noise_schedule = "linear"
  config.model.backbone = "unet"
  config.model.unet_channels = 128
  config.model.unet_channel_mult = (1,)
  config.model.unet_num_res_blocks = 32
  config.model.unet_attention_resolutions = ()
  config.model.num_heads = 1
  config.model.cond_dim = 128
  config.model.dropout_rate = 0.1
  config.batch_size = 256
  config.num_train_steps = 2_000_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.01
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.num_samples = 64
  config.sample_steps = 1000
  return config
