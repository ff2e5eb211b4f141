"""Quick start on real text: the quick-start MD4 on the bundled Tiny Shakespeare.

`python -m md4.main --config=configs/quickstart_text.py --workdir=DIR`

The same model, schedule and budget as quickstart.py, on word pieces: the
first run trains a 1024-piece BPE SentencePiece model on the text (a few
seconds) and tokenises it under config.data_dir; 10% is held out.
`--config.tokens.path=FILE --config.tokens.name=NAME` trains on another
UTF-8 text instead (blank lines separate its documents). There is no known entropy to compare with;
the samples, logged at the end and in TensorBoard's text tab, show what a
minute or two of training learns: common words and names in a word salad
(measured: about half of the sampled words are words of the text, against
a tenth for the same model on characters), not yet sense.
"""

from md4.configs import quickstart
from md4.data import chars


def get_config():
  config = quickstart.get_config()
  config.dataset = "tokens"
  config.tokens.name = "tinyshakespeare"
  config.tokens.path = str(chars.BUNDLED_TEXT)
  config.tokens.documents = "blank_line"
  config.tokens.vocab_size = 1024
  config.tokens.validation_fraction = 0.1
  config.num_samples = 8
  return config
