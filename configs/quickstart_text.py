"""Quick start on real text: the quick-start MD4 on the bundled Tiny Shakespeare.

The same model, schedule and budget as quickstart.py, on characters of the
text8 alphabet (`--config.chars.path=FILE` for another UTF-8 text; 10% held
out). There is no known entropy to compare with; the samples, printed at the
end and in TensorBoard's text tab, show what a few minutes of training learn
(words and spacing, not yet sense).
"""

from md4.configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.dataset = "chars"
  config.chars.validation_fraction = 0.1
  config.num_samples = 8
  return config
