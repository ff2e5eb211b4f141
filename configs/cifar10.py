"""MD4 on CIFAR-10 pixels (Shi et al., 2024, image experiments).

Taken from the MD4 reference code's CIFAR-10 setup: a VDM-style U-Net at full
32x32 resolution (no downsampling), 128 channels, 32 residual blocks, dropout
0.1, each pixel channel a 256-way token; linear schedule, EMA 0.9999.
Chosen here (not checked against the paper): batch 256, lr 2e-4 with 5000
warm-up steps and cosine decay over 2M steps, random horizontal flips.
Class-conditional variant: cifar10_conditional.py.
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
  config.model.dropout_rate = 0.1
  config.batch_size = 256
  config.num_train_steps = 2_000_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.num_samples = 64
  config.sample_steps = 1000
  return config
