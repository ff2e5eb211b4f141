"""MD4-S on OpenWebText with GPT-2's tokenizer.

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

Slice: a v5litepod-8 (8 v5e chips, data parallel), checked without a TPU by
`md4-compile --config=configs/owt.py --topology=v5litepod-8`: the train step
peaks at 11.70 GiB per chip of 16 GiB (27% to spare), the eval step at 11.23
GiB; estimated 0.69 s per step (HBM-bound roofline, MFU 0.31). It fits
because the loss makes its float32 logits 128 positions at a time
(config.loss_chunk_size; the whole [64, 1024, 50257] per chip needs 31.85
GiB of temporaries) and the blocks are recomputed in the backward pass
(model.remat_policy="full").
"""

from md4.configs import text8
from md4 import defaults


def get_config():
  config = defaults.get_config()
  config.dataset = "tokens"
  config.tokens.name = "owt"
  config.tokens.path = "~/.cache/md4/openwebtext/subsets/urlsf_subset*.tar"
  config.tokens.documents = "openwebtext"
  config.tokens.tokenizer = "tiktoken:gpt2"
  config.tokens.validation_documents = 100_000
  config.seq_len = 1024
  config.noise_schedule = "linear"
  text8.set_md4_small(config.model)
  config.model.dropout_rate = 0.02
  config.model.dtype = "bfloat16"
  # To fit a v5litepod-8 (module docstring): logits 128 positions at a time, blocks recomputed.
  config.loss_chunk_size = 128
  config.model.remat_policy = "full"
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
