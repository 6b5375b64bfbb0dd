"""Document order: a global shuffle, optionally in windows that keep reads close together.

`data.shuffle_window = 0` is grain's global index shuffle: every epoch a new permutation of
all documents, computed per index (no memory per document), so each read may land anywhere
in any shard. `data.shuffle_window = W` shuffles globally at two levels instead: the
windows of W consecutive documents are visited in a random order, and the documents inside
each window in a random order (the last n % W documents form a short window read last); a reader then stays within one window (one or two shards)
for W documents, which matters when the shards are remote (gs://). Both orders are new every
epoch and are functions of (seed, epoch, index) only, so they survive a checkpoint as a
plain position.
"""

import grain
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module as index_shuffle


def _permute(index: int, size: int, seed: int) -> int:
  return index if size == 1 else int(index_shuffle.index_shuffle(index, max_index=size - 1, seed=seed, rounds=4))


class WindowedShuffle(grain.MapDataset):
  """Shuffles the order of windows of `window` documents and the documents inside each window."""

  def __init__(self, parent: grain.MapDataset, *, seed: int, window: int):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f"window={window}; allowed values: >= 1")
    self._seed = seed
    self._window = window

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"WindowedShuffle(window={self._window})"

  def shuffled_index(self, index: int) -> int:
    n, w = len(self._parent), self._window
    epoch, i = divmod(index, n)
    seed = (self._seed + epoch * 0x9E3779B1) % (1 << 32)
    full = n // w  # full windows go in a random order; the short remainder (n % w) comes last
    slot, offset = divmod(i, w)
    if slot < full:
      window_id = _permute(slot, full, seed)
      size = w
    else:
      window_id, size = full, n - full * w
    inner = _permute(offset, size, (seed + 1 + window_id) % (1 << 32))
    return epoch * n + window_id * w + inner

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.shuffled_index(index)]


def shuffle(ds: grain.MapDataset, *, seed: int, window: int = 0) -> grain.MapDataset:
  """The documents of `ds` in a new random order every epoch (window 0: grain's global shuffle)."""
  if not window:
    return ds.shuffle(seed=seed)
  return WindowedShuffle(ds, seed=seed, window=window)
