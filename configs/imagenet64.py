"""MD4 on ImageNet 64x64 (Shi et al., 2024), as the reference runs it.

Follows google-deepmind/md4's md4/configs/md4/imagenet64.py with the values
its `sweep()` runs by default: 8 res blocks and 20 DiT blocks (its comments:
24 and 12 "for best likelihood in the paper", here
`--config.model.unet_num_res_blocks=24` `--config.model.num_layers=12`,
198,279,680 parameters, the reference's 198,279,680). Network, the reference's
U-ViT (md4/networks/uvit.py): each pixel channel a 256-way token embedded 256
wide; 256 channels at full 64x64 resolution, 8 res blocks down and 9 up around
a DiT over 2x2 patches (1024 positions, width 768, 20 blocks, 12 heads);
conditioned GroupNorms from a 256-wide conditioning vector; dropout 0.1.
Parameters: 204,595,712, the reference's 204,595,712. Training, the
reference's: batch 512, AdamW with lr 2e-4, b2 0.99, weight decay 0.01, 100
warm-up steps and cosine decay over 2M steps, EMA 0.9999, linear schedule,
continuous time. Chosen here: gradient clipping at norm 1 (the reference has
none), bf16 compute with f32 parameters. Class-conditional variant:
imagenet64_conditional.py.
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "imagenet64"
  config.noise_schedule = "linear"
  config.model.backbone = "uvit"
  config.model.unet_channels = 256
  config.model.unet_channel_mult = (1,)
  config.model.unet_num_res_blocks = 8
  config.model.width = 768
  config.model.num_layers = 20
  config.model.num_heads = 12
  config.model.patch_size = 2
  config.model.cond_dim = 256
  config.model.dropout_rate = 0.1
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.num_train_steps = 2_000_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.01
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.num_eval_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.num_samples = 64
  config.sample_steps = 1000
  return config
