"""The input pipeline: corpus -> ArrayRecord splits -> grain -> checkpointable batches.

`prepare` turns the configured corpus into train/val ArrayRecord files and a tokenizer,
both cached in data.data_dir (see splits.py and tokenizer.py). `make_iterator` reads a
split back with grain:

  ArrayRecord documents -> this process's slice [process_index::process_count]
  -> seeded shuffle (a new order every epoch) -> repeat (num_epochs; None/-1 forever)
  -> tokenize (BOS + pieces + EOS) -> pack into rows of data.seq_len (packing.py)
  -> batch of `batch_size` rows (a final partial batch is dropped)

Batches are dicts of int32 numpy arrays [batch_size, seq_len]: `tokens`, `segment_ids`
(0 = padding, 1..n = the document pieces in the row) and `positions` (0.. within each
piece). Everything runs in the calling process (a few reader threads, no worker
processes), and the output depends only on the corpus, the config and the seed.

Resuming: `iterator_state(it)` is a small JSON-able dict and `restore_iterator(it, state)`
puts a freshly made iterator (same arguments) back at that point. Each process has its
own state; see the README for how the train loop checkpoints them.
"""

import os

import grain
import numpy as np

from sdlm_jax.data import corpus
from sdlm_jax.data import files
from sdlm_jax.data import packing
from sdlm_jax.data import prepared
from sdlm_jax.data import shuffling
from sdlm_jax.data import splits
from sdlm_jax.data import tokenizer as tokenizer_lib
from sdlm_jax.data.tokenizer import Tokenizer
from sdlm_jax.errors import DataFileError, UserInputError

SPLITS = splits.SPLITS
_READ_OPTIONS = grain.ReadOptions(num_threads=min(os.cpu_count() or 1, 4), prefetch_buffer_size=64)


def prepare(data_cfg, vocab_size: int) -> tuple[Tokenizer, dict[str, str]]:
  """Writes the train/val splits once and trains (or loads) the tokenizer on train.

  Returns (tokenizer, {"train": path, "val": path}). A second call with an unchanged
  corpus reads no documents: it finds both in data.data_dir.
  """
  if data_cfg.source == "prepared":
    tokenizer = Tokenizer.load(prepared.local_tokenizer(data_cfg.paths, data_cfg.data_dir))
    _check_vocab(tokenizer, vocab_size)
    return tokenizer, {s: prepared.absolute(data_cfg.paths) for s in SPLITS}
  found = splits.find(data_cfg)
  train_docs = None
  if found:
    fingerprint, paths = found
  else:
    fingerprint, paths, by_split = splits.write(data_cfg, corpus.load_documents(data_cfg))
    train_docs = by_split["train"]
  key = splits.split_key(data_cfg, fingerprint)
  cached = tokenizer_lib.cache_path(data_cfg.data_dir, vocab_size, data_cfg.tokenizer_sample_chars, key)
  if os.path.exists(cached):
    tokenizer = Tokenizer(cached)
  else:
    if train_docs is None:
      train_docs = corpus.read_records(paths["train"])
    if not train_docs:
      raise DataFileError(f"the training split is empty (data.val_fraction={data_cfg.val_fraction}); "
                       "lower data.val_fraction or add data")
    tokenizer = tokenizer_lib.load_or_train(
        data_cfg.data_dir, train_docs, vocab_size, data_cfg.tokenizer_sample_chars, fingerprint=key)
  _check_vocab(tokenizer, vocab_size)
  return tokenizer, paths


def _check_vocab(tokenizer: Tokenizer, vocab_size: int):
  if tokenizer.vocab_size > vocab_size:
    raise UserInputError(f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but "
                     f"model.vocab_size={vocab_size}; allowed values: >= {tokenizer.vocab_size}")


def absolute_paths(data_cfg) -> str:
  """data.paths as config.json should keep it: a local prepared directory made absolute."""
  return prepared.absolute(data_cfg.paths) if data_cfg.source == "prepared" else data_cfg.paths


def split_path(data_cfg, split: str) -> str:
  """The ArrayRecord file of a prepared split."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
  found = splits.find(data_cfg)
  if not found:
    raise FileNotFoundError(f"no prepared split of data.source={data_cfg.source!r} in "
                            f"data.data_dir={data_cfg.data_dir!r}; call sdlm_jax.data.pipeline.prepare first")
  return found[1][split]


class _Tokenize(grain.transforms.Map):
  """UTF-8 record -> int32 [BOS, pieces..., EOS]."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def map(self, record: bytes) -> np.ndarray:
    ids = self._tokenizer.encode(record.decode("utf-8"))
    return np.asarray([self._tokenizer.bos_id, *ids, self._tokenizer.eos_id], np.int32)


def _epochs(num_epochs) -> int | None:
  if num_epochs is None or num_epochs == -1:
    return None
  if int(num_epochs) != num_epochs or num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs!r}; allowed values: a positive integer, or None/-1 (forever)")
  return int(num_epochs)


def document_dataset(data_cfg, *, split: str, seed: int, process_index: int = 0,
                     process_count: int = 1, num_epochs=None, shuffle: bool | None = None) -> grain.MapDataset:
  """The (UTF-8 bytes) documents this process reads, in reading order: shard, shuffle, repeat."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if data_cfg.source == "prepared":
    path = prepared.absolute(data_cfg.paths)
    files_, _ = training_set(data_cfg, split, seed)
    source = grain.sources.ArrayRecordDataSource(files_) if files_ else []
  else:
    path = split_path(data_cfg, split)
    source = grain.sources.ArrayRecordDataSource(path)
  if len(source) == 0:
    raise DataFileError(f"the {split} split is empty (data.val_fraction={data_cfg.val_fraction}): {path}")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DataFileError(f"the {split} split has {len(source)} documents, too few for {process_count} processes")
  if data_cfg.shuffle if shuffle is None else shuffle:
    ds = shuffling.shuffle(ds, seed=seed % (1 << 32), window=data_cfg.shuffle_window)
  return ds.repeat(_epochs(num_epochs))


def training_set(data_cfg, split: str, seed: int) -> tuple[list[str], int]:
  """prepared source: (grain read instructions, tokens) of a split, data.unique_tokens applied to train."""
  unique = data_cfg.unique_tokens if split == "train" else 0
  return prepared.read_instructions(data_cfg.paths, split, unique_tokens=unique, seed=seed)


def train_tokens(data_cfg, tokenizer: Tokenizer, seed: int) -> int:
  """Tokens (BOS/EOS included) of the documents training cycles through: one epoch."""
  if data_cfg.source == "prepared":
    return training_set(data_cfg, "train", seed)[1]
  return int(token_counts(data_cfg, tokenizer, "train").sum())


def make_dataset(data_cfg, tokenizer: Tokenizer, *, split: str, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_epochs=None,
                 shuffle: bool | None = None) -> grain.IterDataset:
  """The batched dataset behind make_iterator (same arguments)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; it is the per-process batch and must be >= 1")
  docs = document_dataset(data_cfg, split=split, seed=seed, process_index=process_index,
                          process_count=process_count, num_epochs=num_epochs, shuffle=shuffle)
  if data_cfg.source == "prepared":
    to_tokens = prepared.DecodeTokens(prepared.load_manifest(data_cfg.paths)["token_dtype"])
  else:
    to_tokens = _Tokenize(tokenizer)
  ds = docs.map(to_tokens).to_iter_dataset(_READ_OPTIONS)
  ds = packing.PackIterDataset(ds, seq_len=data_cfg.seq_len, pad_id=tokenizer.pad_id)
  return ds.batch(batch_size, drop_remainder=True)


def make_iterator(data_cfg, tokenizer: Tokenizer, *, split: str, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_epochs=None,
                  shuffle: bool | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of per-process batches (see the module docstring).

  `shuffle=None` follows data.shuffle; `num_epochs=None` or -1 repeats forever.
  """
  return iter(make_dataset(data_cfg, tokenizer, split=split, batch_size=batch_size, seed=seed,
                           process_index=process_index, process_count=process_count,
                           num_epochs=num_epochs, shuffle=shuffle))


def eval_iterator(data_cfg, tokenizer: Tokenizer, *, batch_size: int, split: str = "val") -> grain.DatasetIterator:
  """One pass over a split in a fixed order (no shuffle, one epoch), for evaluation."""
  return make_iterator(data_cfg, tokenizer, split=split, batch_size=batch_size, seed=0,
                       num_epochs=1, shuffle=False)


def iterator_state(it: grain.DatasetIterator) -> dict:
  """This process's position in its stream: a small dict that survives a JSON round trip."""
  return it.get_state()


def restore_iterator(it: grain.DatasetIterator, state: dict) -> None:
  """Moves a fresh iterator (made with the same arguments) to a saved position."""
  it.set_state(state)


def token_counts(data_cfg, tokenizer: Tokenizer, split: str = "train") -> np.ndarray:
  """Unigram counts [tokenizer.vocab_size] over a split, BOS/EOS included (cached).

  prepared source: the manifest's counts. Otherwise the split is tokenized once, on all
  cores, and the counts cached next to it.
  """
  if data_cfg.source == "prepared":
    return prepared.unigram_counts(data_cfg.paths, split)
  path = split_path(data_cfg, split)
  cache = f"{path}.counts-{tokenizer.fingerprint}.npy"
  if os.path.exists(cache):
    return np.load(cache)
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  docs = corpus.read_records(path)
  for start in range(0, len(docs), 1024):
    batch = tokenizer.encode_batch(docs[start:start + 1024])
    ids = np.concatenate([np.asarray(b, np.int64) for b in batch] + [np.zeros(0, np.int64)])
    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[[tokenizer.bos_id, tokenizer.eos_id]] += len(batch)
  with files.atomic_path(cache) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, counts)
  return counts
