"""Quick start: a small MD4 on the synthetic order-1 Markov source (known entropy).

Trains, evaluates, samples and checkpoints on a CPU, then prints the held-out
bound next to the source's exact entropy (measured times: the README, from
benchmarks/results/quickstart.json). Tried on a 2-core Xeon and kept out:
time_conditioning="none", sequences of 32 in batches of 64, learning rates
1.5e-3 to 3e-3, 8 heads and the poly2 schedule all ended further from the
entropy at the same number of steps (one seed each, 500 to 1300 steps).
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "synthetic"
  config.synthetic.kind = "markov"
  config.seq_len = 64
  config.batch_size = 32
  config.num_train_steps = 1300
  config.model.width = 128
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.ema_rate = 0.99
  config.log_every_steps = 100
  config.eval_every_steps = 650
  config.checkpoint_every_steps = 650
  config.sample_every_steps = 1300
  config.sample_steps = 64
  return config
