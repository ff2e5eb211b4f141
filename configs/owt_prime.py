"""MDM-Prime on OpenWebText: the MD4-S setup of owt.py with partial masking.

The data are owt.py's: GPT-2's 50257 tokens, MDLM's held-out split, the same
prepared folder. Tokens are written as l = 2 sub-tokens (base 225);
`--config.prime.binary=True` uses 16 binary sub-tokens instead. Prepare the
corpus once with `python -m md4.data.prepare --config=configs/owt_prime.py`.
"""

from configs import owt


def get_config():
  config = owt.get_config()
  config.model_type = "prime"
  config.prime.length = 2
  config.prime.binary = False
  return config
