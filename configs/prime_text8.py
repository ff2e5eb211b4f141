"""MDM-Prime on text8: text8.py with partial masking and MDM-Prime's backbone.

Each of the 27 characters is written as l = 2 base-6 sub-tokens
(6^2 = 36 >= 27); `--config.prime.length=3` gives l = 3 base-3 sub-tokens
(27 = 3^3), and `--config.prime.binary=True` five binary ones. Evaluation
reports the valid sub-token NELBO in bits per character, comparable with MD4's.

The MDM-Prime paper reports no text8 result; the network is its text
backbone (owt_prime.py: chen-hao-chao/mdm-prime's text/configs/model/small.yaml,
a DiT of width 768, 12 layers, GELU MLPs, dropout 0.1, no time input) at
text8's length 256, as its text/configs/data/text8.yaml asks, over md4's 27
symbols. Parameters: 92,423,808 against 92,404,123 (+0.02%) for that backbone
with 27 outputs and l = 2, for the reasons owt_prime.py gives (the
checkpoint also holds 77,568 zero output columns that pad 27 logits to 128).
Training as text8.py (MD4's text8 reference: lr 5e-4, weight decay 0.03,
cosine decay), so that the two differ only in the masking and the network.

Slice: a v5litepod-8, checked without a TPU by
`md4-compile --config=configs/prime_text8.py --topology=v5litepod-8`: the
train step peaks at 7.57 GiB per chip of 16 GiB (53% to spare), the eval
step at 2.28 GiB; estimated 0.14 s per step (HBM-bound roofline, MFU 0.32).
"""

from md4.configs import owt_prime
from md4.configs import text8


def get_config():
  config = text8.get_config()
  config.model_type = "prime"
  config.prime.length = 2
  config.prime.binary = False
  config.prime.objective = "nelbo"
  owt_prime.set_mdm_prime_small(config.model)
  return config
