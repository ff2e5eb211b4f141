"""GenMD4 on text8 (Shi et al., 2024, section 6 and its text8 experiments).

The MD4-S text8 setup of text8.py with a learned polynomial schedule per token
value: exponents initialised at 1 (the linear schedule), t_1 = 1e-3, two
masked copies per sequence for the REINFORCE leave-one-out gradient.
"""

from configs import text8


def get_config():
  config = text8.get_config()
  config.model_type = "genmd4"
  config.genmd4.init_power = 1.0
  config.genmd4.t1 = 1e-3
  config.genmd4.single_sample = False
  return config
