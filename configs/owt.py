"""MD4-S on an OpenWebText-style corpus with a GPT-2-sized vocabulary.

From the MD4 paper's OpenWebText setup: sequences of 1024 tokens, 12 layers,
width 768, 12 heads, batch 512, AdamW with lr 3e-4, linear schedule, EMA
0.9999. Chosen here: a SentencePiece BPE vocabulary of 50257 pieces (GPT-2's
size) trained on the corpus itself, 2500 warm-up steps, bf16 compute with f32
parameters. Prepare the corpus once with
`python -m md4.data.prepare --config=configs/owt.py --config.tokens.path=CORPUS`
(CORPUS: one document per line, or see md4/data/tokens.py for other formats).
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "tokens"
  config.tokens.name = "owt"
  config.tokens.vocab_size = 50257
  config.tokens.tokenizer_type = "bpe"
  config.seq_len = 1024
  config.noise_schedule = "linear"
  config.model.width = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.num_train_steps = 1_000_000
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2500
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.num_eval_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.sample_steps = 1000
  return config
