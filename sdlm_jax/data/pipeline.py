"""The input pipeline: documents -> ArrayRecord -> grain (shard, shuffle, repeat, tokenize,
pack, batch) -> checkpointable iterator of numpy batches.

`prepare` turns the configured corpus into train/val ArrayRecord files (one UTF-8 document
per record, written once and cached by corpus fingerprint) and a tokenizer. `make_iterator`
then reads them back with grain; every process reads a disjoint slice of documents. Batches
are dicts of int32 arrays [batch, seq_len]:
  tokens       BOS + pieces + EOS per document, documents concatenated and split into rows
  segment_ids  0 = padding, 1..n = the documents (or document pieces) in the row
  positions    restart at 0 at each segment (RoPE positions)
The iterator's state (`iterator_state`) is a small JSON-able dict saved with each checkpoint.
"""

import hashlib
import os

import grain
import grain.experimental as grain_exp
import numpy as np
from array_record.python import array_record_module

from sdlm_jax.data import corpus
from sdlm_jax.data.tokenizer import Tokenizer, load_or_train

SPLITS = ("train", "val")


def _fingerprint(documents) -> str:
  h = hashlib.sha256()
  for d in documents:
    h.update(hashlib.sha256(d.encode("utf-8")).digest())
  return h.hexdigest()[:16]


def is_validation(doc: str, val_fraction: float) -> bool:
  """Stable split: a document's hash decides, independent of order and process."""
  bucket = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") % 1_000_000
  return bucket < val_fraction * 1_000_000


def _write_records(path: str, docs):
  tmp = f"{path}.{os.getpid()}.tmp"  # processes preparing the same data never share a temp file
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for d in docs:
    writer.write(d.encode("utf-8"))
  writer.close()
  os.replace(tmp, path)


def _split_paths(data_cfg, fingerprint: str) -> dict:
  name = f"{data_cfg.source}_{fingerprint}_val{data_cfg.val_fraction}"
  split_dir = os.path.join(os.path.abspath(data_cfg.data_dir), name)
  return {s: os.path.join(split_dir, f"{s}.array_record") for s in SPLITS}


def prepare(data_cfg, vocab_size: int) -> tuple[Tokenizer, dict]:
  """Loads the corpus, writes train/val ArrayRecord files once, trains or loads the tokenizer.

  Both are cached in data.data_dir under the corpus fingerprint, so a second call (another
  process, a resumed run, evaluation) reuses them.
  """
  docs = corpus.load_documents(data_cfg)
  fingerprint = _fingerprint(docs)
  paths = _split_paths(data_cfg, fingerprint)
  is_val = [is_validation(d, data_cfg.val_fraction) for d in docs]
  if not all(os.path.exists(p) for p in paths.values()):
    os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
    _write_records(paths["train"], [d for d, v in zip(docs, is_val) if not v])
    _write_records(paths["val"], [d for d, v in zip(docs, is_val) if v])
  train_docs = [d for d, v in zip(docs, is_val) if not v]
  tokenizer = load_or_train(data_cfg.data_dir, train_docs, vocab_size, data_cfg.tokenizer_sample_chars, fingerprint)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size={vocab_size}")
  return tokenizer, paths


def split_path(data_cfg, split: str) -> str:
  """The ArrayRecord file of a prepared split (prepare() must have run for this corpus)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
  path = _split_paths(data_cfg, _fingerprint(corpus.load_documents(data_cfg)))[split]
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; call sdlm_jax.data.pipeline.prepare first")
  return path


class _Tokenize(grain.transforms.Map):
  def __init__(self, tokenizer: Tokenizer):
    self._tok = tokenizer

  def map(self, record: bytes):
    ids = self._tok.encode(record.decode("utf-8"))
    return {"tokens": np.asarray([self._tok.bos_id, *ids, self._tok.eos_id], np.int32)}


def _rename(batch):
  return {"tokens": batch["tokens"], "segment_ids": batch["tokens_segment_ids"],
          "positions": batch["tokens_positions"]}


def make_dataset(data_cfg, tokenizer: Tokenizer, *, split: str, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_epochs=None) -> grain.IterDataset:
  source = grain.sources.ArrayRecordDataSource(split_path(data_cfg, split))
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None if num_epochs in (None, -1) else num_epochs)
  ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset()
  ds = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"tokens": data_cfg.seq_len})
  return ds.batch(batch_size, drop_remainder=True).map(_rename)


def make_iterator(data_cfg, tokenizer: Tokenizer, **kwargs) -> grain.DatasetIterator:
  """A checkpointable iterator over `make_dataset(...)` (same arguments)."""
  return iter(make_dataset(data_cfg, tokenizer, **kwargs))


def iterator_state(it: grain.DatasetIterator) -> dict:
  return it.get_state()


def restore_iterator(it: grain.DatasetIterator, state: dict):
  it.set_state(state)


def token_counts(data_cfg, tokenizer: Tokenizer, split: str = "train") -> np.ndarray:
  """Unigram counts over a split (cached next to the split's files)."""
  path = split_path(data_cfg, split)
  cache = f"{path}.counts_{tokenizer.fingerprint}.npy"
  if os.path.exists(cache):
    return np.load(cache)
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  reader = array_record_module.ArrayRecordReader(path)
  for record in reader.read_all():
    ids = [tokenizer.bos_id, *tokenizer.encode(record.decode("utf-8")), tokenizer.eos_id]
    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
  reader.close()
  tmp = f"{cache}.{os.getpid()}.tmp.npy"
  np.save(tmp, counts)
  os.replace(tmp, cache)
  return counts
