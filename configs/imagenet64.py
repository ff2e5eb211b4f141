"""MD4 on downsampled ImageNet 64x64 pixels (Shi et al., 2024, image experiments).

The MD4 reference models 64x64 images with a transformer over patches; here a
DiT (adaLN-zero) over 4x4 patches, 12 layers, width 768, 12 heads, each pixel
channel a 256-way token. Chosen here (not checked against the paper): batch
512, lr 2e-4 with 5000 warm-up steps and cosine decay over 2M steps, bf16
compute, linear schedule, EMA 0.9999. Class-conditional variant:
imagenet64_conditional.py.
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "imagenet64"
  config.noise_schedule = "linear"
  config.model.backbone = "dit"
  config.model.patch_size = 4
  config.model.width = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.num_train_steps = 2_000_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5000
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.num_eval_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.num_samples = 64
  config.sample_steps = 1000
  return config
