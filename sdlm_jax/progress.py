"""Progress bars for the long host-side loops (training steps, evaluation batches, sampling steps).

One place decides how a bar looks: tqdm on stderr with a rate and ETA, hidden when the caller
did not ask for one and, unless `terminal_only=False` (the training bar, which is a job log's
only progress line), when stderr is not a terminal (logs and pipes stay clean).
"""

import sys

from tqdm import tqdm


def bar(iterable=None, *, total=None, desc: str, unit: str, enabled: bool, initial: int = 0,
        terminal_only: bool = True):
  """A tqdm bar over `iterable` (or updated by hand up to `total`); a silent one unless enabled."""
  return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
              leave=not terminal_only, disable=(None if terminal_only else False) if enabled else True)
