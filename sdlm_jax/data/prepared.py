"""Prepared (pre-tokenized) data: the directory layout `sdlm-prepare` writes and how training reads it.

  DIR/manifest.json        written last: format, tokenizer (file, sha256, special ids), token dtype,
                           and per split the documents, tokens (BOS/EOS included) and unigram
                           counts, in total and per shard
  DIR/tokenizer.model      the sentencepiece model the tokens were made with
  DIR/train/shard-KKKKK-of-NNNNN.array_record, DIR/val/...   one document per record: its token
                           ids [BOS, pieces..., EOS] as little-endian uint16 (int32 when the
                           vocabulary has more than 65536 pieces)
  DIR/stats/shard-KKKKK.npz   per shard and split: document lengths and unigram counts (a shard
                           is finished when this file exists; `manifest.json` sums them)
  DIR/plan.json            which input parts go to which shard (an interrupted prepare resumes it)

Training (`data.source='prepared'`, `data.paths=DIR`) opens only the manifest: the shards
are handed to grain's ArrayRecordDataSource as `FILE[0:N]` read instructions built from
the manifest's counts, so nothing is opened, listed or copied at start-up and host memory
does not grow with the corpus. Every other access goes through etils.epath; the ArrayRecord
reader itself (C++, riegeli's GcsReader) opens `gs://` paths natively, with the machine's
default credentials, or a local emulator named by STORAGE_EMULATOR_HOST.
"""

import functools
import hashlib
import io
import json
import os

import numpy as np
from etils import epath
from jaxtyping import Int32

from sdlm_jax import storage
from sdlm_jax.errors import DataFileError, InputNotFoundError, UserInputError

FORMAT = "sdlm-prepared"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.model"
SPLITS = ("train", "val")


def shard_name(split: str, k: int, n: int) -> str:
  return f"{split}/shard-{k:05d}-of-{n:05d}.array_record"


def stats_name(k: int) -> str:
  return f"stats/shard-{k:05d}.npz"


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "int32"


def absolute(directory: str) -> str:
  """A local directory made absolute (config.json must work from anywhere); gs:// as given."""
  return storage.location(directory)


@functools.lru_cache(maxsize=16)
def _load(directory: str) -> dict:
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise InputNotFoundError(
        f"data.paths={directory!r} has no {MANIFEST}: with data.source='prepared' it must be a directory "
        "written by `sdlm-prepare --out DIR` (an interrupted prepare writes the manifest last: re-run it)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise DataFileError(f"{path} is not an {FORMAT} v{VERSION} manifest (format={manifest.get('format')!r}, "
                        f"version={manifest.get('version')!r})")
  return manifest


def load_manifest(directory: str) -> dict:
  """The manifest of a prepared directory (read once per process)."""
  return _load(absolute(directory))


def local_tokenizer(directory: str, cache_dir: str) -> str:
  """A local path of DIR's tokenizer.model; a gs:// one is copied once into cache_dir (keyed by hash)."""
  directory = absolute(directory)
  manifest = load_manifest(directory)
  src = epath.Path(directory) / manifest["tokenizer"]["file"]
  if not storage.is_remote(directory):
    return str(src)
  target = os.path.join(os.path.abspath(cache_dir), f"prepared-tokenizer-{manifest['tokenizer']['sha256'][:16]}.model")
  if not os.path.exists(target):
    data = src.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["tokenizer"]["sha256"]:
      raise DataFileError(f"{src} does not match the sha256 in its {MANIFEST}")
    storage.write_bytes(target, data)  # a temporary file of its own: processes sharing cache_dir may race here
  return target


def split_info(directory: str, split: str) -> dict:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
  return load_manifest(directory)["splits"][split]


def shard_lengths(directory: str, k: int, split: str) -> np.ndarray:
  """Token counts of the documents of one shard of a split, in record order."""
  data = (epath.Path(absolute(directory)) / stats_name(k)).read_bytes()
  with np.load(io.BytesIO(data)) as stats:
    return stats[f"{split}_lengths"]


def _instruction(directory: str, file: str, take: int) -> str:
  return f"{epath.Path(directory) / file}[0:{take}]"


def read_instructions(directory: str, split: str, *, unique_tokens: int = 0, seed: int = 0) -> tuple[list[str], int]:
  """(grain read instructions `FILE[0:N]`, tokens they hold) for a split.

  `unique_tokens` > 0 keeps a seed-determined subset of the train split: whole shards in a
  seeded order, then a prefix of one more, the fewest documents holding at least that many
  tokens. Only that last shard's stats file is read.
  """
  directory = absolute(directory)
  info = split_info(directory, split)
  shards = [(k, s) for k, s in enumerate(info["shards"]) if s["documents"]]
  if not unique_tokens:
    return [_instruction(directory, s["file"], s["documents"]) for _, s in shards], int(info["tokens"])
  if split != "train":
    raise ValueError("unique_tokens applies to the train split only")
  if unique_tokens > info["tokens"]:
    raise UserInputError(f"data.unique_tokens={unique_tokens} exceeds the {info['tokens']} tokens of the train "
                         f"split in {directory}; allowed values: 0 (all) or 1..{info['tokens']}")
  order = np.random.default_rng(seed).permutation(len(shards))
  out, total = [], 0
  for i in order:
    k, s = shards[i]
    if total + s["tokens"] <= unique_tokens:
      out.append(_instruction(directory, s["file"], s["documents"]))
      total += s["tokens"]
    else:
      cumulative = np.cumsum(shard_lengths(directory, k, split))
      take = int(np.searchsorted(cumulative, unique_tokens - total)) + 1
      out.append(_instruction(directory, s["file"], take))
      total += int(cumulative[take - 1])
    if total >= unique_tokens:
      break
  return out, total


def unigram_counts(directory: str, split: str = "train") -> np.ndarray:
  """Unigram counts [vocab] of a split (BOS/EOS included), counted once by sdlm-prepare."""
  return np.asarray(split_info(directory, split)["unigram_counts"], np.int64)


class DecodeTokens:
  """ArrayRecord record (token ids as bytes) -> int32 [BOS, pieces..., EOS]; a grain map."""

  def __init__(self, dtype: str):
    self._dtype = np.dtype(dtype).newbyteorder("<")

  def __call__(self, record: bytes) -> Int32[np.ndarray, "T"]:
    tokens_T = np.frombuffer(record, self._dtype).astype(np.int32)
    return tokens_T
