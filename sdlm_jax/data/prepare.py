"""`sdlm-prepare`: stream a corpus into tokenized ArrayRecord shards (layout: prepared.py).

  1. plan      the input is cut into parts (inputs.py) and the parts are given, in order and
               balanced by size, to `num_shards` shards; DIR/plan.json records it
  2. tokenizer --tokenizer FILE is checked and copied, or a BPE model is trained on a
               sample spread over the parts (at most `sample_chars` characters of training
               documents: memory does not grow with the corpus)
  3. shards    worker processes (all cores by default) each write whole shards: read the
               parts' documents one at a time, hold out a document for validation by a
               stable hash of its text (splits.is_validation), encode, write
               train/val records, count unigrams; files are written under a temporary
               name and renamed (copied, for gs://), the shard's stats file last
  4. manifest  sums the stats files into DIR/manifest.json, written last

Re-running with the same arguments skips every shard whose stats file exists, so an
interrupted prepare finishes only the missing shards; other arguments on an existing DIR
are an error naming what differs.
"""

import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
import sentencepiece as spm
from array_record.python import array_record_module
from etils import epath

from sdlm_jax import storage
from sdlm_jax.data import inputs
from sdlm_jax.data import prepared
from sdlm_jax.data import splits
from sdlm_jax.data import tokenizer as tokenizer_lib
from sdlm_jax.errors import InputNotFoundError, UserInputError, check_number

DEFAULT_SHARD_BYTES = 64 << 20
MIN_SHARDS = 16
_ENCODE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Options:
  """What sdlm-prepare was asked to do (the CLI flags)."""

  input: str
  out: str
  tokenizer: str | None = None
  vocab_size: int = 4096
  val_fraction: float = 0.05
  num_shards: int = 0           # 0: max(16, input bytes / 64 MiB), or the existing plan's
  workers: int = 0              # 0: all cores
  text_field: str = "text"
  tfds_data_dir: str | None = None
  sample_chars: int = 4_000_000


def _check(opts: Options):
  check_number("--val_fraction", opts.val_fraction, lo=0, hi=1, hi_open=True)
  check_number("--num_shards", opts.num_shards, lo=0, integer=True, note="(0: automatic)")
  check_number("--workers", opts.workers, lo=0, integer=True, note="(0: all cores)")
  check_number("--sample_chars", opts.sample_chars, lo=1, integer=True)
  if not opts.tokenizer:
    check_number("--vocab_size", opts.vocab_size, lo=tokenizer_lib.MASK_ID + 260, integer=True,
                 note="(a trained tokenizer keeps the 256 byte pieces and the special ids)")
  if not opts.out:
    raise UserInputError("--out is empty; allowed values: a local or gs:// directory")


# ------------------------------------------------------------------ files


def _tmp_for(dest: epath.Path) -> str:
  """A fresh local temporary path: next to `dest` when it is local (so a rename publishes it)."""
  folder = str(dest.parent) if not storage.is_remote(str(dest)) else None
  if folder:
    os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=dest.name + ".", suffix=".tmp")
  os.close(fd)
  return tmp


def _publish(tmp: str, dest: epath.Path):
  """Moves a finished local file to `dest`: a rename locally, a streamed upload (atomic object) on gs://."""
  try:
    if storage.is_remote(str(dest)):
      dest.parent.mkdir(parents=True, exist_ok=True)
      with open(tmp, "rb") as src, dest.open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    else:
      os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_bytes(dest: epath.Path, data: bytes):
  tmp = _tmp_for(dest)
  with open(tmp, "wb") as f:
    f.write(data)
  _publish(tmp, dest)


# ------------------------------------------------------------------ plan


def _assign(parts: list[inputs.Part], num_shards: int) -> list[list[inputs.Part]]:
  """Parts in order to shards: a part goes to the shard its first byte falls in (by size)."""
  total = sum(p.size for p in parts) or 1
  shards = [[] for _ in range(num_shards)]
  start = 0
  for p in parts:
    shards[min(num_shards - 1, start * num_shards // total)].append(p)
    start += p.size
  return shards


def _plan(opts: Options, out: epath.Path) -> dict:
  stored = json.loads((out / prepared.PLAN).read_text()) if (out / prepared.PLAN).exists() else None
  whole = inputs.plan_parts(opts.input, target_size=1 << 62, tfds_data_dir=opts.tfds_data_dir)
  total = sum(p.size for p in whole)
  num_shards = opts.num_shards or (stored["num_shards"] if stored else
                                   max(MIN_SHARDS, math.ceil(total / DEFAULT_SHARD_BYTES)))
  parts = inputs.plan_parts(opts.input, target_size=math.ceil(total / num_shards) or 1,
                            tfds_data_dir=opts.tfds_data_dir)
  tok = ({"file_sha256": hashlib.sha256(epath.Path(opts.tokenizer).read_bytes()).hexdigest()} if opts.tokenizer
         else {"vocab_size": opts.vocab_size, "sample_chars": opts.sample_chars,
               "trainer_version": tokenizer_lib.TRAINER_VERSION})
  plan = {"format": prepared.FORMAT, "version": prepared.VERSION, "input": opts.input,
          "text_field": opts.text_field, "val_fraction": opts.val_fraction, "num_shards": num_shards,
          "tokenizer": tok, "shards": [[p.to_json() for p in s] for s in _assign(parts, num_shards)]}
  if stored is not None and stored != plan:
    changed = [k for k in plan if stored.get(k) != plan[k]]
    detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {plan[k]!r}" for k in changed if k != "shards")
    raise UserInputError(
        f"--out {out} holds a prepare of other inputs or options ({detail or 'the input files changed'}); "
        "re-run with the same arguments to finish it, or choose another --out")
  if stored is None:
    _write_bytes(out / prepared.PLAN, json.dumps(plan).encode())
  return plan


# ------------------------------------------------------------------ tokenizer


def _sample(plan: dict, opts: Options, budget: int) -> list[str]:
  """Training documents spread over the parts, about `budget` characters in all."""
  parts = [inputs.Part.from_json(p) for shard in plan["shards"] for p in shard]
  if not parts:
    return []
  chosen = parts[::max(1, len(parts) // 64)]
  quota = max(1, budget // len(chosen))
  docs = []
  for part in chosen:
    seen = 0
    for doc in inputs.read_part(part, text_field=opts.text_field, tfds_data_dir=opts.tfds_data_dir):
      if splits.is_validation(doc, opts.val_fraction):
        continue
      docs.append(doc[:quota - seen])
      seen += len(docs[-1])
      if seen >= quota:
        break
  return docs


def _tokenizer(plan: dict, opts: Options, out: epath.Path, log) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, stored at DIR/tokenizer.model (copied, or trained on a sample)."""
  dest = out / prepared.TOKENIZER
  with tempfile.TemporaryDirectory() as tmp_dir:
    local = os.path.join(tmp_dir, prepared.TOKENIZER)
    if dest.exists():
      data = dest.read_bytes()
    elif opts.tokenizer:
      data = epath.Path(opts.tokenizer).read_bytes()
    else:
      start = time.perf_counter()
      docs = _sample(plan, opts, opts.sample_chars)
      if not docs:
        raise UserInputError(f"--input {opts.input} holds no training documents to train a tokenizer on")
      tokenizer_lib.train(docs, opts.vocab_size, opts.sample_chars, local)
      with open(local, "rb") as f:
        data = f.read()
      log(f"trained a {opts.vocab_size}-piece tokenizer on {sum(map(len, docs)):,} characters "
          f"in {time.perf_counter() - start:.1f} s")
    with open(local, "wb") as f:
      f.write(data)
    _check_special_ids(local, opts.tokenizer or str(dest))
    tok = tokenizer_lib.Tokenizer(local)
    if not dest.exists():
      _write_bytes(dest, data)
  tok.model_path = str(dest)
  return tok


def _check_special_ids(path: str, name: str):
  """The ids the diffusion stack relies on (tokenizer.py); one line naming those that differ."""
  sp = spm.SentencePieceProcessor(model_file=path)
  have = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(),
          "[MASK]": sp.piece_to_id(tokenizer_lib.MASK_PIECE) if sp.get_piece_size() > tokenizer_lib.MASK_ID else -1}
  want = {"pad": tokenizer_lib.PAD_ID, "unk": tokenizer_lib.UNK_ID, "bos": tokenizer_lib.BOS_ID,
          "eos": tokenizer_lib.EOS_ID, "[MASK]": tokenizer_lib.MASK_ID}
  wrong = [f"{k} is {have[k]}" for k in want if have[k] != want[k]]
  if wrong:
    raise UserInputError(
        f"--tokenizer {name}: {', '.join(wrong)}; sdlm_jax needs pad 0, unk 1, bos 2, eos 3 and a "
        f"{tokenizer_lib.MASK_PIECE} piece at 4 (spm_train --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3 "
        f"--user_defined_symbols={tokenizer_lib.MASK_PIECE}), or leave --tokenizer out to train one")


# ------------------------------------------------------------------ shards


def _write_shard(job: dict) -> dict:
  """Writes one shard's train/val files and then its stats file; returns its counts."""
  out = epath.Path(job["out"])
  sp = spm.SentencePieceProcessor(model_proto=job["model_proto"])
  vocab, dtype = sp.get_piece_size(), np.dtype(job["dtype"]).newbyteorder("<")
  bos, eos = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
  k, n = job["shard"], job["num_shards"]
  tmps = {s: _tmp_for(out / prepared.shard_name(s, k, n)) for s in prepared.SPLITS}
  writers = {s: array_record_module.ArrayRecordWriter(tmps[s], "group_size:1") for s in prepared.SPLITS}
  counts = {s: np.zeros(vocab, np.int64) for s in prepared.SPLITS}
  lengths = {s: [] for s in prepared.SPLITS}

  def flush(batch):
    for doc, ids in zip(batch, sp.encode(batch, num_threads=1)):
      split = "val" if splits.is_validation(doc, job["val_fraction"]) else "train"
      tokens = np.asarray([bos, *ids, eos], dtype)
      writers[split].write(tokens.tobytes())
      lengths[split].append(tokens.size)
      counts[split] += np.bincount(tokens, minlength=vocab)

  batch = []
  try:
    for row in job["parts"]:
      for doc in inputs.read_part(inputs.Part.from_json(row), text_field=job["text_field"],
                                  tfds_data_dir=job["tfds_data_dir"]):
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
          flush(batch)
          batch = []
    flush(batch)
  finally:
    for w in writers.values():
      w.close()
  for s in prepared.SPLITS:
    _publish(tmps[s], out / prepared.shard_name(s, k, n))
  buf = io.BytesIO()
  np.savez(buf, **{f"{s}_counts": counts[s] for s in prepared.SPLITS},
           **{f"{s}_lengths": np.asarray(lengths[s], np.int64) for s in prepared.SPLITS})
  _write_bytes(out / prepared.stats_name(k), buf.getvalue())
  return {"shard": k, "documents": sum(len(v) for v in lengths.values()),
          "tokens": int(sum(sum(v) for v in lengths.values()))}


def _manifest(plan: dict, out: epath.Path, tok: tokenizer_lib.Tokenizer) -> dict:
  n = plan["num_shards"]
  out_splits = {s: {"documents": 0, "tokens": 0, "unigram_counts": np.zeros(tok.vocab_size, np.int64),
                    "shards": []} for s in prepared.SPLITS}
  for k in range(n):
    with np.load(io.BytesIO((out / prepared.stats_name(k)).read_bytes())) as stats:
      for s, info in out_splits.items():
        docs, tokens = int(stats[f"{s}_lengths"].size), int(stats[f"{s}_lengths"].sum())
        info["documents"] += docs
        info["tokens"] += tokens
        info["unigram_counts"] += stats[f"{s}_counts"]
        info["shards"].append({"file": prepared.shard_name(s, k, n), "documents": docs, "tokens": tokens})
  for info in out_splits.values():
    info["unigram_counts"] = info["unigram_counts"].tolist()
  proto = tok._sp.serialized_model_proto()  # pylint: disable=protected-access
  return {
      "format": prepared.FORMAT, "version": prepared.VERSION, "input": plan["input"],
      "text_field": plan["text_field"], "val_fraction": plan["val_fraction"], "num_shards": n,
      "token_dtype": prepared.token_dtype(tok.vocab_size),
      "tokenizer": {"file": prepared.TOKENIZER, "sha256": hashlib.sha256(proto).hexdigest(),
                    "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "unk_id": tok.unk_id,
                    "bos_id": tok.bos_id, "eos_id": tok.eos_id, "mask_id": tok.mask_id},
      "splits": out_splits,
  }


def run(opts: Options, log=print) -> dict:
  """Prepares (or finishes preparing) opts.out; returns the manifest."""
  _check(opts)
  out = epath.Path(prepared.absolute(opts.out))
  if opts.tokenizer:  # before anything is written to --out
    src = epath.Path(opts.tokenizer)
    if not src.exists():
      raise InputNotFoundError(f"--tokenizer {opts.tokenizer} not found")
    with tempfile.TemporaryDirectory() as tmp_dir:
      local = os.path.join(tmp_dir, prepared.TOKENIZER)
      with open(local, "wb") as f:
        f.write(src.read_bytes())
      _check_special_ids(local, opts.tokenizer)
  out.mkdir(parents=True, exist_ok=True)
  plan = _plan(opts, out)
  tok = _tokenizer(plan, opts, out, log)
  n = plan["num_shards"]
  todo = [k for k in range(n) if not (out / prepared.stats_name(k)).exists()]
  log(f"{len(todo)} of {n} shards to write ({n - len(todo)} already done) into {out}")
  proto = tok._sp.serialized_model_proto()  # pylint: disable=protected-access
  jobs = [{"out": str(out), "shard": k, "num_shards": n, "parts": plan["shards"][k], "model_proto": proto,
           "dtype": prepared.token_dtype(tok.vocab_size), "val_fraction": plan["val_fraction"],
           "text_field": plan["text_field"], "tfds_data_dir": opts.tfds_data_dir} for k in todo]
  workers = min(opts.workers or os.cpu_count() or 1, max(1, len(jobs)))
  start = time.perf_counter()
  if workers == 1:
    results = map(_write_shard, jobs)
  else:  # spawn: gcsfs and grain threads do not survive a fork
    pool = multiprocessing.get_context("spawn").Pool(workers)
    results = pool.imap_unordered(_write_shard, jobs)
  try:
    for done, r in enumerate(results, 1):
      log(f"shard {r['shard']:5d}: {r['documents']:,} documents, {r['tokens']:,} tokens "
          f"({done}/{len(jobs)}, {time.perf_counter() - start:.1f} s)")
  finally:
    if workers > 1:
      pool.close()
      pool.join()
  manifest = _manifest(plan, out, tok)
  _write_bytes(out / prepared.MANIFEST, json.dumps(manifest).encode())
  prepared._load.cache_clear()  # pylint: disable=protected-access
  tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
  log(f"wrote {out}/{prepared.MANIFEST}: train {tr['documents']:,} documents / {tr['tokens']:,} tokens, "
      f"val {va['documents']:,} documents / {va['tokens']:,} tokens")
  if opts.val_fraction > 0 and not va["documents"]:
    log(f"warning: no document was held out for validation (--val_fraction={opts.val_fraction}); "
        "training on this directory will stop before it starts: raise --val_fraction or add documents")
  return manifest
