"""GPT-2-style tokenizers: a byte-level BPE trained here drives preparation, training, evaluation.

The BPE is trained with `tokenizers` on the bundled tinyshakespeare.txt and
saved three ways: as a tokenizer.json (what users have for GPT-2), and as
GPT-2's release files under OpenAI's names (encoder.json, vocab.bpe) and
Hugging Face's (vocab.json, merges.txt), which tiktoken reads offline.
"""

import json
import pathlib
import re
import shutil
import sys

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models as bpe_models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from md4 import data as data_lib
from md4 import defaults
from md4 import eval_results
from md4 import evaluate
from md4 import train
from md4.data import document_files
from md4.data import tokenizer as tokenizer_lib
from md4.data import tokens
from md4.data import zero_shot
from tests import helpers
from tests.test_images import load_config
from tests.test_train import tiny_config

SHAKESPEARE = pathlib.Path(tokens.__file__).parent / "assets" / "tinyshakespeare.txt"
END = "<|endoftext|>"


def train_bpe(vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level BPE like GPT-2's: 256 byte pieces, merges, then <|endoftext|> last."""
  bpe = tokenizers.Tokenizer(bpe_models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train([str(SHAKESPEARE)], trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  bpe.add_special_tokens([END])
  return bpe


def save_gpt2_files(bpe: tokenizers.Tokenizer, folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """tokenizer.json, and GPT-2's two files under OpenAI's and Hugging Face's names."""
  folder.mkdir()
  bpe.save(str(folder / "tokenizer.json"))
  (folder / "huggingface").mkdir()
  bpe.model.save(str(folder / "huggingface"))
  (folder / "openai").mkdir()
  shutil.copy(folder / "huggingface" / "vocab.json", folder / "openai" / "encoder.json")
  shutil.copy(folder / "huggingface" / "merges.txt", folder / "openai" / "vocab.bpe")
  return {"json": folder / "tokenizer.json", "huggingface": folder / "huggingface",
          "openai": folder / "openai"}


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory) -> dict[str, pathlib.Path]:
  return save_gpt2_files(train_bpe(600), tmp_path_factory.mktemp("bpe") / "files")


@pytest.fixture(autouse=True)
def tiktoken_cache(tmp_path, monkeypatch):
  """tiktoken copies the files it reads into its cache: a fresh one per test, not /tmp's."""
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))


def _documents() -> list[str]:
  """The play's speeches, a document each (blank-line separated)."""
  return [text for text, _ in document_files.iter_documents([SHAKESPEARE], "blank_line")]


TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         f"one{END}two {END} three", "caf\u00e9 \u2603 -- 1234 'tis  done\n\n"]


def test_tiktoken_reads_gpt2_files_offline_and_matches_the_tokenizer_json(bpe_files):
  from_json = tokenizer_lib.load(str(bpe_files["json"]))
  from_openai = tokenizer_lib.load("tiktoken:gpt2", str(bpe_files["openai"]))
  from_huggingface = tokenizer_lib.load("tiktoken:gpt2", str(bpe_files["huggingface"]))
  assert from_json.kind == "huggingface" and from_openai.kind == "tiktoken"
  # GPT-2's layout: the end of text is the last id (50256 in GPT-2's 50257).
  assert from_json.vocab_size == from_openai.vocab_size == 601
  assert from_json.eod_id == from_openai.eod_id == 600
  encoded = from_json.encode_batch(TEXTS)
  assert from_openai.encode_batch(TEXTS) == from_huggingface.encode_batch(TEXTS) == encoded
  assert encoded[1].count(600) == 2  # <|endoftext|> in the text is the special token.
  assert all(len(ids) < len(text) for ids, text in zip(encoded, TEXTS))  # Merges are used.
  for tokenizer in (from_json, from_openai):
    assert [tokenizer.decode(ids) for ids in encoded] == TEXTS
  assert from_openai.sha256 == from_huggingface.sha256  # The same vocabulary, either names.
  assert from_json.sha256 == tokenizer_lib.file_sha256(bpe_files["json"])


def test_tokenizer_errors_say_what_to_give(bpe_files, tmp_path):
  with pytest.raises(ValueError, match="neither encoder.json"):
    tokenizer_lib.load("tiktoken:gpt2", str(tmp_path))
  with pytest.raises(ValueError, match="reads GPT-2's BPE files only"):
    tokenizer_lib.load("tiktoken:cl100k_base", str(bpe_files["openai"]))
  with pytest.raises(ValueError, match="tokens.tokenizer=.*give a SentencePiece .model"):
    tokenizer_lib.load(str(bpe_files["openai"] / "vocab.bpe"))
  (tmp_path / "broken.json").write_text('{"model": 3}')
  with pytest.raises(ValueError, match="is not a Hugging Face tokenizers file"):
    tokenizer_lib.load(str(tmp_path / "broken.json"))
  mismatched = tmp_path / "mismatched"
  mismatched.mkdir()
  shutil.copy(bpe_files["openai"] / "vocab.bpe", mismatched / "vocab.bpe")
  (mismatched / "encoder.json").write_text(json.dumps({"a": 0}))
  with pytest.raises(ValueError, match="are not one GPT-2-format BPE"):
    tokenizer_lib.load("tiktoken:gpt2", str(mismatched))


def test_a_tokenizer_json_without_the_hf_extra_says_what_to_install(bpe_files, monkeypatch):
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # As when tokenizers is not installed.
  with pytest.raises(ValueError, match=re.escape("pip install 'md4[hf]'")):
    tokenizer_lib.load(str(bpe_files["json"]))


def _corpus(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "shakespeare.txt"
  shutil.copy(SHAKESPEARE, path)
  return path


def _options(path, **overrides):
  return helpers.data_config("tokens", path=str(path), documents="blank_line",
                             **overrides).tokens


def test_manifest_follows_the_tokenizer_of_every_kind(bpe_files, tmp_path):
  path = _corpus(tmp_path)
  documents = _documents()
  built = tokens.load_or_build(_options(path, tokenizer=str(bpe_files["json"])),
                               tmp_path / "json")
  stream = tokens.encode_documents(built.tokenizer, documents)
  np.testing.assert_array_equal(built.tokens, stream)
  assert built.manifest["tokenizer"] == {"kind": "huggingface",
                                         "model": str(bpe_files["json"].resolve()),
                                         "sha256": built.tokenizer.sha256}
  np.testing.assert_array_equal(built.document_ends, np.cumsum(
      [len(ids) + 1 for ids in built.tokenizer.encode_batch(documents)]))

  tiktoken_options = _options(path, tokenizer="tiktoken:gpt2",
                              tiktoken_dir=str(bpe_files["openai"]))
  from_tiktoken = tokens.load_or_build(tiktoken_options, tmp_path / "tiktoken")
  np.testing.assert_array_equal(from_tiktoken.tokens, stream)  # The same ids either way.
  assert from_tiktoken.manifest["tokenizer"]["kind"] == "tiktoken"
  # The same vocabulary from the other copy of the files: the corpus is current.
  tiktoken_options.tiktoken_dir = str(bpe_files["huggingface"])
  assert not tokens.load_or_build(tiktoken_options, tmp_path / "tiktoken").rebuilt

  # Another vocabulary, in place of the files read before: rebuilt, for either kind.
  other = save_gpt2_files(train_bpe(500), tmp_path / "other")
  shutil.copy(other["json"], bpe_files["json"].parent / "retrained.json")
  retrained = tokens.load_or_build(
      _options(path, tokenizer=str(bpe_files["json"].parent / "retrained.json")),
      tmp_path / "json")
  assert retrained.rebuilt and retrained.vocab_size == 501
  tiktoken_options.tiktoken_dir = str(other["openai"])
  again = tokens.load_or_build(tiktoken_options, tmp_path / "tiktoken")
  assert again.rebuilt and again.eod_id == 500


def test_held_out_documents_are_packed_apart(bpe_files, tmp_path):
  path = _corpus(tmp_path)
  config = helpers.data_config(
      "tokens", data_dir=str(tmp_path / "data"), seq_len=32, batch_size=4, path=str(path),
      documents="blank_line", tokenizer=str(bpe_files["json"]), validation_documents=50)
  dataset = data_lib.create(config)
  corpus = tokens.load_or_build(config.tokens, tokens.folder(config))
  held_out = tokens.encode_documents(corpus.tokenizer, _documents()[-50:])
  rows = np.concatenate([batch["x"] for batch in dataset.eval_batches()])
  usable = len(held_out) // 32 // 4 * 4  # Whole batches of whole sequences.
  np.testing.assert_array_equal(rows, held_out[:usable * 32].reshape(usable, 32))
  with pytest.raises(ValueError, match="validation_documents=100000 leaves no training"):
    config.tokens.validation_documents = 100_000
    data_lib.create(config)


def _zero_shot_files(folder: pathlib.Path) -> str:
  """Each set in its own format, from the play's lines."""
  folder.mkdir()
  lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()][:1200]
  (folder / "lambada_test.jsonl").write_text(
      "".join(json.dumps({"text": " ".join(lines[i:i + 4])}) + "\n"
              for i in range(0, 400, 4)))
  (folder / "wiki.valid.raw").write_text("".join(f" {line} \n \n" for line in lines[:300]))
  (folder / "ptb.valid.txt").write_text("".join(f" {line.lower()} \n" for line in lines[300:600]))
  heldout = folder / "heldout-monolingual.tokenized.shuffled"
  heldout.mkdir()
  (heldout / "news.en.heldout-00000-of-00050").write_text("\n".join(lines[600:900]) + "\n")
  (heldout / "news.en.heldout-00001-of-00050").write_text("\n".join(lines[900:]) + "\n")
  return ",".join([f"lambada:{folder / 'lambada_test.jsonl'}",
                   f"wikitext2:{folder / 'wiki.valid.raw'}", f"ptb:{folder / 'ptb.valid.txt'}",
                   f"wikitext103:{folder / 'wiki.valid.raw'}", f"lm1b:{heldout}"])


def test_a_gpt2_style_corpus_trains_and_gives_the_zero_shot_table(bpe_files, tmp_path):
  config = tiny_config(dataset="tokens", data_dir=str(tmp_path / "data"), seq_len=32,
                       batch_size=8, num_train_steps=4)
  config.tokens.update(path=str(_corpus(tmp_path)), documents="blank_line",
                       tokenizer=str(bpe_files["json"]), validation_documents=100)
  summary = data_lib.prepare_dataset(config, progress=False)
  assert summary["tokenizer"]["kind"] == "huggingface"
  assert summary["vocab_size"] == 601 and summary["eod_id"] == 600
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  assert np.isfinite([line["eval_bits_per_token"] for line in lines
                      if "eval_bits_per_token" in line]).all()

  spec = _zero_shot_files(tmp_path / "sets")
  results = evaluate.run(evaluate.Options(str(workdir), zero_shot=spec, num_t=2, batch_size=8))
  tokenizer = tokenizer_lib.load(str(bpe_files["json"]))
  assert list(results["nelbo"]) == [f"zero_shot:{name}" for name, _ in zero_shot.parse(spec)]
  for name, path in zero_shot.parse(spec):
    section = results["nelbo"][f"zero_shot:{name}"]
    ids = zero_shot.token_ids(name, path, tokenizer)
    # Every whole sequence is scored, the last batch's filling is not.
    assert section["num_sequences"] == len(ids) // 32 and section["set_tokens"] == len(ids)
    assert section["set"] == zero_shot.SETS[name].title
    # A bound on a 601-id vocabulary from an all-but-untrained model: near log2(601) = 9.23.
    assert 5.0 < section["bits_per_token"] < 11.0
    assert section["perplexity"] == pytest.approx(2 ** section["bits_per_token"])
  saved = json.loads(pathlib.Path(results["results_file"]).read_text())
  assert saved["nelbo"] == results["nelbo"]
  # WikiText2 and WikiText103 read the same file here: the same sequences, seed and bound.
  assert (results["nelbo"]["zero_shot:wikitext2"]["bits_per_token"]
          == results["nelbo"]["zero_shot:wikitext103"]["bits_per_token"])
  printed = eval_results.summary(results).splitlines()
  table = printed[printed.index("| Set | Sequences | Bits per token | Perplexity (bound) |"):]
  assert [row.split(" | ")[0] for row in table[2:]] == [
      "| LAMBADA", "| WikiText2", "| PTB", "| WikiText103", "| One Billion Words"]

  with pytest.raises(ValueError, match="zero_shot ptb:.*no file matches"):
    evaluate.run(evaluate.Options(str(workdir), zero_shot=f"ptb:{tmp_path / 'none.txt'}"))


@pytest.mark.parametrize("name", ["owt", "owt_prime"])
def test_openwebtext_configs_use_gpt2_and_mdlms_split(name):
  config = defaults.validate(load_config(name))
  assert config.dataset == "tokens" and config.tokens.tokenizer == "tiktoken:gpt2"
  assert config.tokens.documents == "openwebtext"
  assert config.tokens.validation_documents == 100_000
