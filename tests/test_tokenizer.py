"""SentencePiece tokenizer: special ids, lossless round trips, the cache, concurrent training."""

import multiprocessing
import os

import pytest

from sdlm_jax.data import tokenizer as tokenizer_lib

VOCAB = 320
SAMPLE = 60_000


@pytest.fixture(scope="module")
def documents():
  """A few thousand characters of varied text, so tiny vocabularies still train."""
  verse = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
           "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.")
  prose = ("The quick brown fox jumps over the lazy dog; 1234 numbers, 56.78 decimals.\n\n"
           "  Indented line with  double  spaces, tabs\tand UPPER case.")
  return [f"{verse}\n\n{prose}\n\nPart {i}: " + "word " * (i % 17) for i in range(60)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, documents):
  return tokenizer_lib.load_or_train(str(tmp_path_factory.mktemp("tok")), documents, VOCAB, SAMPLE)


def test_special_ids_and_pieces(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.id_to_piece(tok.mask_id) == "[MASK]" and tok.id_to_piece(tokenizer_lib.NEWLINE_ID) == "\n"
  assert 256 < tok.vocab_size <= VOCAB
  assert tok.encode("[MASK]")[-1] == tok.mask_id  # prompts can spell out a mask for infilling


@pytest.mark.parametrize("text", [
    "Shall I compare thee to a summer's day?",
    "  leading spaces, trailing spaces  ",
    "two  spaces, a\ttab,\nnew lines\n\n\nand blank ones\n",
    "unseen: naïve café, Ωmega, 中文, emoji 🙂, ligature ﬁ, nbsp\u00a0here",
    "digits 3.14159 and 2024-01-01",
    "",
])
def test_decode_inverts_encode(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_decode_skips_special_and_unknown_ids(tok):
  ids = [tok.bos_id, *tok.encode("summer"), tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "summer"
  assert tok.decode([*tok.encode("May"), tok.vocab_size + 7, -1]) == "May"  # untrained rows of a larger model


def test_second_call_loads_the_cached_model(tmp_path, documents, monkeypatch):
  first = tokenizer_lib.load_or_train(str(tmp_path), documents, VOCAB, SAMPLE)
  monkeypatch.setattr(tokenizer_lib, "train", lambda *a, **k: pytest.fail("retrained a cached tokenizer"))
  again = tokenizer_lib.load_or_train(str(tmp_path), documents, VOCAB, SAMPLE)
  assert again.model_path == first.model_path and again.fingerprint == first.fingerprint
  assert tokenizer_lib.Tokenizer.load(first.model_path).encode("May") == first.encode("May")
  # Another corpus, vocabulary or sample size is another cache entry.
  keys = {tokenizer_lib.cache_path(str(tmp_path), v, s, fp)
          for v, s, fp in [(VOCAB, SAMPLE, "a"), (VOCAB + 1, SAMPLE, "a"), (VOCAB, SAMPLE + 1, "a"), (VOCAB, SAMPLE, "b")]}
  assert len(keys) == 4


def test_training_is_deterministic(tmp_path, documents):
  a = tokenizer_lib.train(documents, VOCAB, SAMPLE, str(tmp_path / "a.model"))
  b = tokenizer_lib.train(documents, VOCAB, SAMPLE, str(tmp_path / "b.model"))
  assert a.fingerprint == b.fingerprint  # hosts without a shared disk train the same model


def test_small_corpus_gives_a_smaller_vocabulary(tmp_path):
  tok = tokenizer_lib.load_or_train(str(tmp_path), ["a tiny corpus.\n\nOnly two lines."], 4096, 1000)
  assert 256 < tok.vocab_size < 4096
  assert tok.decode(tok.encode("a tiny corpus")) == "a tiny corpus"


def _train_in_subprocess(args):
  data_dir, documents = args
  return tokenizer_lib.load_or_train(data_dir, documents, VOCAB, SAMPLE).fingerprint


def test_two_processes_training_at_once_leave_one_valid_model(tmp_path, documents):
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    prints = pool.map(_train_in_subprocess, [(str(tmp_path), documents)] * 2)
  assert prints[0] == prints[1]
  assert [f for f in os.listdir(tmp_path) if not f.endswith(".model")] == []  # no temp files left
  assert tokenizer_lib.load_or_train(str(tmp_path), documents, VOCAB, SAMPLE).fingerprint == prints[0]


def test_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))
