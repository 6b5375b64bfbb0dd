"""SentencePiece tokenizer with the special ids the diffusion stack relies on.

ids: pad 0, unk 1, bos 2, eos 3, [MASK] 4, newline 5. `[MASK]` is a user-defined piece, so
a prompt may spell it out to ask for infilling; the newline is its own piece so line
structure survives a round trip. The model is BPE with byte fallback and the identity
normaliser (no whitespace collapsing), so `decode(encode(text)) == text` for any text
that does not itself contain the string "[MASK]".

The model is trained in-process on a sample of the training documents and cached in
`data_dir` under a name keyed by vocabulary size, sample size and a corpus fingerprint,
so every later call (another host, a resumed run, evaluation) loads the same file.
"""

import hashlib
import io
import os

import sentencepiece as spm

from sdlm_jax import storage
from sdlm_jax.data import files
from sdlm_jax.errors import InputNotFoundError, UserInputError

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, NEWLINE_ID = 0, 1, 2, 3, 4, 5
MASK_PIECE = "[MASK]"
_SKIPPED_ON_DECODE = frozenset((PAD_ID, BOS_ID, EOS_ID, MASK_ID))
# Bump when the trainer options below change: it is part of the cache key.
TRAINER_VERSION = 2


class Tokenizer:
  """A SentencePieceProcessor plus the project's special ids (see the module docstring)."""

  pad_id, unk_id, bos_id, eos_id, mask_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID

  def __init__(self, model_path: str):
    self.model_path = model_path  # local or gs:// (read through sdlm_jax.storage)
    self._sp = spm.SentencePieceProcessor(model_proto=storage.path(model_path).read_bytes())
    if self._sp.piece_to_id(MASK_PIECE) != MASK_ID or self._sp.pad_id() != PAD_ID:
      raise UserInputError(f"{model_path}: pad/[MASK] are not ids {PAD_ID}/{MASK_ID}; "
                       "not a tokenizer made by sdlm_jax")

  @classmethod
  def load(cls, model_path: str) -> "Tokenizer":
    if not storage.path(model_path).exists():
      raise InputNotFoundError(f"tokenizer model {model_path} not found")
    return cls(model_path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def fingerprint(self) -> str:
    """Content hash of the model: caches derived from a tokenizer are keyed by it."""
    return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text, on all cores."""
    return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids) -> str:
    """Text of `ids`, skipping pad/bos/eos/[MASK] and ids the model does not have."""
    size = self.vocab_size
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < size and int(i) not in _SKIPPED_ON_DECODE])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _sample(documents, sample_chars: int):
  """Paragraphs of documents spread evenly over the corpus, about sample_chars in total."""
  documents = list(documents)
  total = sum(len(d) for d in documents)
  stride = max(1, round(total / max(sample_chars, 1)))
  seen = 0
  for doc in documents[::stride]:
    for para in doc.split("\n\n"):
      if para.strip():
        yield para
        seen += len(para)
        if seen >= sample_chars:
          return


def train(documents, vocab_size: int, sample_chars: int, model_path: str) -> Tokenizer:
  """Trains BPE on a sample of `documents`; writes the model atomically to model_path.

  A corpus too small for `vocab_size` pieces yields a smaller vocabulary (never a larger
  one), so a tiny corpus still trains; the model keeps its configured embedding size.
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_sample(documents, sample_chars), model_writer=buf, vocab_size=vocab_size,
      model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=[MASK_PIECE, "\n"], byte_fallback=True, hard_vocab_limit=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
      num_threads=min(os.cpu_count() or 1, 8), minloglevel=2)
  with files.atomic_path(model_path) as tmp:
    with open(tmp, "wb") as f:
      f.write(buf.getvalue())
  return Tokenizer(model_path)


def cache_path(data_dir: str, vocab_size: int, sample_chars: int, fingerprint: str) -> str:
  """Where load_or_train keeps the model for this vocabulary, sample size and corpus."""
  key = files.fingerprint([fingerprint, sample_chars, TRAINER_VERSION])
  return os.path.join(os.path.abspath(data_dir), f"tokenizer-v{vocab_size}-{key}.model")


def load_or_train(data_dir: str, documents, vocab_size: int, sample_chars: int, *,
                  fingerprint: str | None = None) -> Tokenizer:
  """Loads the cached model for this corpus, or trains and caches it.

  `fingerprint` identifies the corpus in the cache name; by default it is a hash of
  `documents` (pass it when the caller already has one, to skip hashing).
  """
  documents = list(documents)
  fingerprint = fingerprint or files.fingerprint(documents)
  path = cache_path(data_dir, vocab_size, sample_chars, fingerprint)
  if os.path.exists(path):
    return Tokenizer(path)
  return train(documents, vocab_size, sample_chars, path)
