"""One-off data preparation for a config: `python -m md4.data.prepare --config=configs/x.py`.

  text8        downloads text8.zip into data_dir (checked size and SHA-256);
  chars        reads and normalises data.path, reporting the split sizes;
  tokens       trains the SentencePiece model and tokenises the corpus into
               data_dir, with a progress bar (reused when already current);
  cifar10,
  imagenet64   downloads and prepares the tfds dataset as array_record;
  synthetic    nothing to prepare; reports the exact entropy.

Prints one JSON line describing what is ready.
"""

import json
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from md4 import data as data_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def prepare(config: ml_collections.ConfigDict, progress: bool = True) -> dict[str, Any]:
  """Makes config.dataset ready to read offline; returns a summary."""
  dataset = config.dataset
  if dataset == "text8":
    from md4.data import text8  # pylint: disable=g-import-not-at-top
    options = data_lib.data_options(config, text8.DEFAULTS)
    path = text8.find_or_download(config.get("data_dir", None) or text8.DEFAULT_DIR,
                                  url=options.url, allow_download=options.download,
                                  timeout=options.timeout)
    ids = text8.read_ids(path)
    return {"dataset": dataset, "path": str(path), "characters": len(ids),
            "splits": text8.split_bounds(len(ids))}
  if dataset == "chars":
    from md4.data import chars  # pylint: disable=g-import-not-at-top
    options = data_lib.data_options(config, chars.DEFAULTS)
    ids = chars.read_ids(options.path, strict=options.strict)
    num_train, num_validation = data_lib.split_chunks(len(ids), config.seq_len,
                                                      options.validation_fraction)
    return {"dataset": dataset, "characters": len(ids), "train_chunks": num_train,
            "validation_chunks": num_validation}
  if dataset == "tokens":
    from md4.data import tokens  # pylint: disable=g-import-not-at-top
    options = data_lib.data_options(config, tokens.DEFAULTS)
    corpus = tokens.load_or_build(options, tokens.folder_of(config), progress=progress)
    return {"dataset": dataset, "folder": str(tokens.folder_of(config)),
            "rebuilt": corpus.rebuilt, "vocab_size": corpus.vocab_size,
            "eod_id": corpus.eod_id, "tokens": corpus.manifest["num_tokens"],
            "documents": corpus.manifest["num_documents"]}
  if dataset in ("cifar10", "imagenet64"):
    from md4.data import images  # pylint: disable=g-import-not-at-top
    options = data_lib.data_options(config, images.DEFAULTS)
    name = images.tfds_name(config, options)
    data_dir = config.get("data_dir", None) or None
    sizes = {}
    for split in (options.train_split, options.eval_split or images.EVAL_SPLITS[dataset]):
      sizes[split] = len(images.load_split(name, split, data_dir, download=True))
    return {"dataset": dataset, "tfds_name": name, "examples": sizes}
  if dataset == "synthetic":
    created = data_lib.create(config)
    return {"dataset": dataset, "entropy_bits_per_token": created.entropy_bits_per_token}
  raise ValueError(f"unknown dataset {dataset!r}; valid: {data_lib.DATASETS}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(prepare(_CONFIG.value)))


if __name__ == "__main__":
  app.run(main)
