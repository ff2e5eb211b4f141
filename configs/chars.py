"""MD4 on local text files mapped to the text8 alphabet (default: the bundled Tiny Shakespeare).

Point `--config.chars.path` at one or more UTF-8 files (a glob works); 10% of
the characters, at a chunk boundary, are held out. A small model: 4 layers,
width 256, sequences of 256 characters.
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "chars"
  config.chars.validation_fraction = 0.1
  config.seq_len = 256
  config.model.width = 256
  config.model.num_layers = 4
  config.model.num_heads = 8
  config.batch_size = 32
  config.num_train_steps = 20_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 500
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  config.sample_every_steps = 2000
  return config
