"""File helpers shared by the data caches: atomic writes and content fingerprints.

Several processes (hosts of one job, or a trainer and an evaluator) may build the same
cache entry at once. Each writes to its own temporary file in the target folder and
renames it into place, so a reader only ever sees a missing or a complete file, and
the last of several identical writers wins harmlessly.
"""

import contextlib
import hashlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a fresh temporary path next to `path`; renames it onto `path` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def fingerprint(parts) -> str:
  """A short stable hash of an iterable of strings (order matters, boundaries count)."""
  h = hashlib.sha256()
  for part in parts:
    h.update(hashlib.sha256(str(part).encode("utf-8")).digest())
  return h.hexdigest()[:16]
