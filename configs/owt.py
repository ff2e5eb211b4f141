"""MD4-S on an OpenWebText-style corpus with a GPT-2-sized vocabulary.

Model and optimiser follow google-deepmind/md4's md4/configs/md4/openwebtext.py
with the values its launcher runs by default (its `sweep()`, "Small size",
overrides `get_config()`): dropout 0.02, weight decay 0.03, linear schedule,
rather than the file's dropout 0 and weight decay 0. Architecture, the
reference's MD4 network for that file: the MD4-S network of configs/text8.py
(width 768, 12 layers, 64-wide conditioning, GLU MLPs of width 2048) with a
full-width (50258 x 768) input table. Parameters at 50257 tokens:
165,857,344, the reference's 165,857,344 (the checkpoint also holds 36,096
zero output columns that pad 50257 logits to 50304 and receive no gradient).
Training, the reference's: sequences of 1024 tokens, batch 512, AdamW (lr
3e-4, b2 0.999) with 2000 warm-up steps then cosine decay to 0 over 1M
steps, EMA 0.9999. Chosen here: gradient clipping at norm 1 (the reference
has none), bf16 compute with f32 parameters. Differences left: no dropout on
the input embeddings or attention probabilities, initialisation (see
configs/text8.py).

Data, chosen here: a SentencePiece BPE vocabulary of 50257 pieces (GPT-2's
size) trained on the corpus itself. Prepare the corpus once with
`python -m md4.data.prepare --config=configs/owt.py --config.tokens.path=CORPUS`
(CORPUS: one document per line, or see md4/data/tokens.py for other formats).
"""

from configs import text8
from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "tokens"
  config.tokens.name = "owt"
  config.tokens.vocab_size = 50257
  config.tokens.tokenizer_type = "bpe"
  config.seq_len = 1024
  config.noise_schedule = "linear"
  text8.set_md4_small(config.model)
  config.model.dropout_rate = 0.02
  config.model.dtype = "bfloat16"
  config.batch_size = 512
  config.num_train_steps = 1_000_000
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.optimizer.weight_decay = 0.03
  config.optimizer.b2 = 0.999
  config.ema_rate = 0.9999
  config.log_every_steps = 500
  config.eval_every_steps = 20_000
  config.num_eval_steps = 100
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 20_000
  config.sample_steps = 1000
  return config
