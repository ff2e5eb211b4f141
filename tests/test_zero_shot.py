"""Zero-shot sets: each reader and detokeniser on a tiny file of the set's format, by hand."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from md4 import eval_results
from md4.data import zero_shot


class ByteTokenizer:
  """Ids = UTF-8 bytes, end of document = 256: streams that can be written down by hand."""

  kind = "bytes"
  identity = {"kind": "bytes"}
  vocab_size = 257
  eod_id = 256
  sha256 = ""

  def encode_batch(self, texts):
    return [list(text.encode("utf-8")) for text in texts]

  def decode(self, ids):
    return bytes(ids).decode("utf-8")


def test_wikitext_detokenizer():
  assert zero_shot.wikitext_detokenizer(
      ' The game \'s 1 @,@ 000 @-@ year ( roughly ) history , " he said " . \n') == (
          ' The game\'s 1,000-year (roughly) history, "he said".\n')
  assert zero_shot.wikitext_detokenizer(" = = Reception = = \n") == " == Reception ==\n"
  assert zero_shot.wikitext_detokenizer("at 5 @.@ 5 ° C ; [ a ] { b } ' c '") == (
      "at 5.5°C; [a] {b} 'c'")


def test_ptb_detokenizer():
  assert zero_shot.ptb_detokenizer(
      "the company 's shares rose N N N to $ N a share <unk> co. said it would n't") == (
          "the company's shares rose 1 1 1 to $1 a share ? co. said it wouldn't")
  assert zero_shot.ptb_detokenizer("a N \\/ N stake of the investors ' # N fund") == (
      "a 1 / 1 stake of the investors' #1 fund")


def test_lm1b_detokenizer():
  assert zero_shot.lm1b_detokenizer(
      'Visit http : / / example.com now , he said ; " it \'s fine " ( really ) $ 5 .') == (
          'Visit http://example.com now, he said; "it\'s fine" (really) $5.')
  assert zero_shot.lm1b_detokenizer("Why ? Because £ 3 ! [ sic ] Yes !") == (
      "Why? Because £3! [sic] Yes!")


def test_lambada_detokenizer():
  assert zero_shot.lambada_detokenizer("\u201cHi,\u201d she said.  ") == '\n"Hi," she said.'


def test_wikitext_rows_keep_newlines_and_blank_lines(tmp_path):
  path = tmp_path / "wiki.valid.raw"
  path.write_text(" \n = Title = \n \n Text one . \n")
  assert list(zero_shot.rows("wikitext2", str(path))) == ["", " = Title =\n", "", " Text one.\n"]
  assert list(zero_shot.rows("wikitext103", str(path))) == [
      "", " = Title =\n", "", " Text one.\n"]


def test_ptb_rows_are_stripped_lines(tmp_path):
  path = tmp_path / "ptb.valid.txt"
  path.write_text(" aer banknote N \n the dog 's bone \n\n")
  assert list(zero_shot.rows("ptb", str(path))) == ["aer banknote N", "the dog's bone", ""]


def test_lambada_rows_are_the_text_of_each_json_line(tmp_path):
  path = tmp_path / "lambada_test.jsonl"
  path.write_text(json.dumps({"text": "\u201cNo,\u201d said Tom"}) + "\n\n"
                  + json.dumps({"text": "one more "}) + "\n")
  assert list(zero_shot.rows("lambada", str(path))) == ['\n"No," said Tom', "\none more"]
  path.write_text('{"text": "ok"}\n["not", "an", "object"]\n')
  with pytest.raises(ValueError, match="lambada_test.jsonl:2: not a JSON object"):
    list(zero_shot.rows("lambada", str(path)))


def test_lm1b_reads_every_heldout_file_of_a_folder_in_order(tmp_path):
  folder = tmp_path / "heldout-monolingual.tokenized.shuffled"
  folder.mkdir()
  (folder / "news.en.heldout-00001-of-00050").write_text("Second file .\n")
  (folder / "news.en.heldout-00000-of-00050").write_text("It 's here .\nWhy ?\n")
  (folder / "README").write_text("not a heldout file\n")
  assert list(zero_shot.rows("lm1b", str(folder))) == ["It's here.", "Why?", "Second file."]
  with pytest.raises(ValueError, match="holds no news.en.heldout"):
    list(zero_shot.rows("lm1b", str(tmp_path)))


def test_parquet_rows_use_the_sets_column(tmp_path):
  path = tmp_path / "validation-00000-of-00001.parquet"
  pq.write_table(pa.table({"sentence": ["the cat 's mat", "N years"]}), path)
  assert list(zero_shot.rows("ptb", str(path))) == ["the cat's mat", "N years"]
  with pytest.raises(ValueError, match="no column 'text'"):
    list(zero_shot.rows("wikitext2", str(path)))


def test_token_stream_and_packing(tmp_path):
  path = tmp_path / "ptb.test.txt"
  path.write_text(" ab \n\n c 's \n")
  ids = zero_shot.token_ids("ptb", str(path), ByteTokenizer())
  # Rows "ab", "", "c's", each followed by the end-of-document id 256.
  expected = [97, 98, 256, 256, 99, 39, 115, 256]
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_array_equal(zero_shot.sequences(ids, 3), [expected[:3], expected[3:6]])


def test_parse_names_and_paths():
  assert zero_shot.parse("lambada:/a/lambada_test.jsonl, ptb:b.txt") == [
      ("lambada", "/a/lambada_test.jsonl"), ("ptb", "b.txt")]
  with pytest.raises(ValueError, match="unknown set 'wiki'"):
    zero_shot.parse("wiki:/a")
  with pytest.raises(ValueError, match="is not NAME:PATH"):
    zero_shot.parse("lambada")
  with pytest.raises(ValueError, match="named twice"):
    zero_shot.parse("ptb:a,ptb:b")


def test_table_lists_the_sets_in_order():
  section = {"set": "PTB", "num_sequences": 12, "bits_per_token": 6.5,
             "bits_per_token_stderr": 0.0125, "perplexity": 90.5, "perplexity_stderr": 0.784}
  nelbo = {"eval": {"bits_per_token": 1.0}, "zero_shot:ptb": section,
           "zero_shot:lambada": {**section, "set": "LAMBADA"}}
  assert eval_results.zero_shot_table(nelbo) == [
      "| Set | Sequences | Bits per token | Perplexity (bound) |",
      "| --- | ---: | ---: | ---: |",
      "| PTB | 12 | 6.5000 ± 0.0125 | 90.50 ± 0.78 |",
      "| LAMBADA | 12 | 6.5000 ± 0.0125 | 90.50 ± 0.78 |"]
  assert eval_results.zero_shot_table({"eval": {}}) == []
