"""MD4-S on OpenWebText with GPT-2's tokenizer.

From the MD4 paper's OpenWebText setup: sequences of 1024 tokens, 12 layers,
width 768, 12 heads, batch 512, AdamW with lr 3e-4, linear schedule, EMA
0.9999. Chosen here: 2500 warm-up steps, bf16 compute with f32 parameters.

Data (docs/data.md): GPT-2's tokenizer (tiktoken's gpt2 encoding: 50257 ids,
<|endoftext|> = 50256 ends each document), documents packed into 1024-token
sequences as the MD4 reference packs them. Held out: MDLM's OpenWebText
split, the last 100,000 documents of the Hugging Face dataset's order (the
MD4 reference's own split, 2% of the sequences shuffled without a seed, cannot
be reproduced). tokens.path defaults to the Hugging Face dataset's 21
urlsf_subset*.tar archives; its parquet shards work with
--config.tokens.documents=parquet. Prepare once with
`python -m md4.data.prepare --config=configs/owt.py`; offline, point
--config.tokens.tiktoken_dir at GPT-2's encoder.json and vocab.bpe, or give
GPT-2's tokenizer.json as --config.tokens.tokenizer.
"""

from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "tokens"
  config.tokens.name = "owt_gpt2"
  config.tokens.path = "~/.cache/md4/openwebtext/subsets/urlsf_subset*.tar"
  config.tokens.documents = "openwebtext"
  config.tokens.tokenizer = "tiktoken:gpt2"
  config.tokens.validation_documents = 100_000
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
