"""MD4-S on text8 (Shi et al., 2024, text8 setup).

From the paper: 12 layers, width 768, 12 heads, sequence length 256, batch 512,
AdamW with lr 3e-4, 2000 warm-up steps then cosine decay, linear schedule,
EMA 0.9999, 1M steps. Chosen here: no weight decay or dropout, gradient
clipping at 1, bf16 compute with f32 parameters.
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "text8"
  config.seq_len = 256
  config.noise_schedule = "linear"
  config.model.width = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.num_train_steps = 1_000_000
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.num_eval_steps = -1
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.sample_steps = 1000
  return config
