"""SentencePiece tokenizer with the special ids the diffusion stack relies on.

ids: pad 0, unk 1, bos 2, eos 3, [MASK] 4, newline 5 (kept as its own piece, so line
structure survives a round trip). Byte fallback makes any text encodable. The model is
trained in-process on the corpus and cached by vocabulary size and corpus fingerprint.
"""

import hashlib
import io
import os
import tempfile

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "[MASK]"


class Tokenizer:
  """Thin wrapper over a SentencePieceProcessor; see module docstring for the ids."""

  pad_id, unk_id, bos_id, eos_id, mask_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID

  def __init__(self, model_path: str):
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if self._sp.piece_to_id(MASK_PIECE) != MASK_ID:
      raise ValueError(f"{model_path}: [MASK] is not id {MASK_ID}; not a tokenizer made by sdlm_jax")

  @classmethod
  def load(cls, model_path: str) -> "Tokenizer":
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"tokenizer model {model_path} not found")
    return cls(model_path)

  @property
  def fingerprint(self) -> str:
    """Content hash of the model: caches derived from a tokenizer are keyed by it."""
    return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    special = (PAD_ID, BOS_ID, EOS_ID, MASK_ID)
    return self._sp.decode([int(i) for i in ids if int(i) not in special])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def _sentences(documents, max_chars: int):
  """Paragraphs of the documents, up to max_chars characters in total."""
  total = 0
  for doc in documents:
    for para in doc.split("\n\n"):
      if para.strip():
        yield para
        total += len(para)
        if total >= max_chars:
          return


def train_tokenizer(documents, vocab_size: int, sample_chars: int, model_path: str) -> Tokenizer:
  """Trains a BPE model on up to `sample_chars` characters; writes it atomically."""
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_sentences(documents, sample_chars), model_writer=buf, vocab_size=vocab_size,
      model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=[MASK_PIECE, "\n"], byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, split_digits=True, max_sentence_length=1 << 16,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(model_path) or ".", suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, model_path)  # atomic: concurrent trainers never see a partial file
  return Tokenizer(model_path)


def load_or_train(data_dir: str, documents, vocab_size: int, sample_chars: int, fingerprint: str) -> Tokenizer:
  path = os.path.join(data_dir, f"tokenizer_v{vocab_size}_{fingerprint}.model")
  if os.path.exists(path):
    return Tokenizer(path)
  return train_tokenizer(documents, vocab_size, sample_chars, path)
