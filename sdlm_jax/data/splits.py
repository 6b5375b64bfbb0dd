"""The train/val split of a corpus, stored once as ArrayRecord files in data.data_dir.

Layout under data_dir:
  corpus-<signature>.json                 source signature -> corpus fingerprint
  <source>-<fingerprint>-val<frac>/{train,val}.array_record   one UTF-8 document per record

The signature (file names, sizes and mtimes) is cheap to compute, so finding the split of
an unchanged corpus reads no documents; the fingerprint hashes the documents themselves,
so identical corpora share their files. Which split a document lands in depends only on
its own text (a stable hash), never on its position, the process or the run.
"""

import hashlib
import json
import os

from array_record.python import array_record_module

from sdlm_jax.data import corpus
from sdlm_jax.data import files

SPLITS = ("train", "val")
_BUCKETS = 1 << 32


def _bucket(doc: str) -> int:
  return int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:4], "big")


def is_validation(doc: str, val_fraction: float) -> bool:
  """Whether a document is held out; a function of its text and val_fraction only."""
  return _bucket(doc) < val_fraction * _BUCKETS


def split_documents(docs: list[str], val_fraction: float) -> dict[str, list[str]]:
  """{"train": [...], "val": [...]} in corpus order; the two never share a document.

  With val_fraction > 0 at least one distinct text is held out (the lowest-hash one), so
  a small corpus still has something to evaluate on.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"data.val_fraction={val_fraction!r}; allowed values: 0 <= val_fraction < 1")
  held = {d for d in docs if is_validation(d, val_fraction)}
  if val_fraction > 0 and not held and len(set(docs)) > 1:
    held = {min(docs, key=_bucket)}
  return {"train": [d for d in docs if d not in held], "val": [d for d in docs if d in held]}


def _manifest_path(data_cfg) -> str:
  return os.path.join(os.path.abspath(data_cfg.data_dir), f"corpus-{corpus.source_signature(data_cfg)}.json")


def split_key(data_cfg, fingerprint: str) -> str:
  """Names the split: corpus fingerprint and val_fraction (the tokenizer cache uses it too)."""
  return f"{data_cfg.source}-{fingerprint}-val{data_cfg.val_fraction:g}"


def _paths(data_cfg, fingerprint: str) -> dict[str, str]:
  folder = os.path.join(os.path.abspath(data_cfg.data_dir), split_key(data_cfg, fingerprint))
  return {s: os.path.join(folder, f"{s}.array_record") for s in SPLITS}


def cached_fingerprint(data_cfg) -> str | None:
  """The corpus fingerprint recorded for the current source files, if any."""
  path = _manifest_path(data_cfg)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)["fingerprint"]


def find(data_cfg) -> tuple[str, dict[str, str]] | None:
  """(fingerprint, {split: path}) of an already written split of this corpus, else None."""
  fingerprint = cached_fingerprint(data_cfg)
  if fingerprint is None:
    return None
  paths = _paths(data_cfg, fingerprint)
  return (fingerprint, paths) if all(os.path.exists(p) for p in paths.values()) else None


def write_records(path: str, docs) -> None:
  """One UTF-8 record per document, written atomically."""
  with files.atomic_path(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for doc in docs:
      writer.write(doc.encode("utf-8"))
    writer.close()


def write(data_cfg, docs: list[str]) -> tuple[str, dict[str, str], dict[str, list[str]]]:
  """Splits `docs`, writes the files that are missing and the manifest.

  Returns (fingerprint, {split: path}, {split: documents}).
  """
  fingerprint = files.fingerprint(docs)
  paths = _paths(data_cfg, fingerprint)
  by_split = split_documents(docs, data_cfg.val_fraction)
  for split, path in paths.items():
    if not os.path.exists(path):
      write_records(path, by_split[split])
  with files.atomic_path(_manifest_path(data_cfg)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"fingerprint": fingerprint, "source": data_cfg.source, "paths": data_cfg.paths,
                 "num_documents": len(docs)}, f)
  return fingerprint, paths, by_split
