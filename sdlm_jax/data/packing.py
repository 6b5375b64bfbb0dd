"""Concat-then-split packing of token sequences into fixed-length rows.

Documents (1-D int arrays) are laid end to end and cut every `seq_len` tokens, so every
row is full except possibly the very last one of a finite stream, which is padded. A
document cut at a row boundary continues at the start of the next row. Each row carries
  tokens_L       the tokens (pad_id where padding)
  segment_ids_L  0 = padding, 1..n = the document pieces in the row, left to right
  positions_L    0, 1, ... within each piece (a continued document restarts at 0)

Why not grain's ConcatThenSplitIterDataset: in grain 0.2.18 its state holds tuples and
treats `(-1, -1)` as "no remainder"; after a JSON round trip (which is how any iterator
state reaches a checkpoint, grain's own orbax handler included) the tuple is a list, and
a restore at a row boundary silently skips or repeats documents. The state here is two
plain fields: the parent's state before the current document, and how many of that
document's tokens were already emitted.
"""

import copy

import grain
import numpy as np
from jaxtyping import Int32


class _PackIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset; see the module docstring."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._doc = None                # tokens of the document being cut, or None
    self._offset = 0                # tokens of self._doc already emitted
    self._doc_state = None          # parent state from just before self._doc was read
    self._exhausted = False

  def _next_doc(self) -> bool:
    """Reads the next non-empty document from the parent; False at the end."""
    while not self._exhausted:
      state = self._parent.get_state()
      try:
        doc = np.asarray(next(self._parent), np.int32)
      except StopIteration:
        self._exhausted = True
        return False
      if doc.size:
        self._doc, self._offset, self._doc_state = doc, 0, state
        return True
    return False

  def __next__(self) -> dict[str, Int32[np.ndarray, "L"]]:
    length = self._seq_len
    tokens_L = np.full(length, self._pad_id, np.int32)
    segment_ids_L = np.zeros(length, np.int32)
    positions_L = np.zeros(length, np.int32)
    filled = segment = 0
    while filled < length and (self._doc is not None or self._next_doc()):
      take = min(length - filled, len(self._doc) - self._offset)
      segment += 1
      tokens_L[filled:filled + take] = self._doc[self._offset:self._offset + take]
      segment_ids_L[filled:filled + take] = segment
      positions_L[filled:filled + take] = np.arange(take, dtype=np.int32)
      filled += take
      self._offset += take
      if self._offset == len(self._doc):
        self._doc = None
    if not filled:
      raise StopIteration
    return {"tokens": tokens_L, "segment_ids": segment_ids_L, "positions": positions_L}

  def get_state(self) -> dict:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": copy.deepcopy(self._doc_state), "offset": int(self._offset)}

  def set_state(self, state: dict):
    self._parent.set_state(state["parent"])
    self._doc, self._offset, self._exhausted = None, 0, False
    if state["offset"]:
      if not self._next_doc():
        raise ValueError(f"cannot restore packing state {state}: the input ended early")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Packs a stream of 1-D token arrays into rows of exactly `seq_len` tokens."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int = 0):
    super().__init__(parent)
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"
