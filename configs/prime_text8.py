"""MDM-Prime on text8: the MD4-S text8 setup of text8.py with partial masking.

Each of the 27 characters is written as l = 2 base-6 sub-tokens (6^2 = 36 >= 27);
`--config.prime.length=3` gives l = 3 base-3 sub-tokens (27 = 3^3), and
`--config.prime.binary=True` five binary ones. Evaluation reports the valid
sub-token NELBO in bits per character, comparable with MD4's.
"""

from configs import text8


def get_config():
  config = text8.get_config()
  config.model_type = "prime"
  config.prime.length = 2
  config.prime.binary = False
  config.prime.objective = "nelbo"
  return config
