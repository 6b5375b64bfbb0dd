"""Progress bars for the long host-side loops (evaluation batches, sampling steps).

One place decides how a bar looks: tqdm on stderr with a rate and ETA, hidden when stderr
is not a terminal (logs and pipes stay clean) and when the caller did not ask for one.
"""

import sys

from tqdm import tqdm


def bar(iterable=None, *, total=None, desc: str, unit: str, enabled: bool):
  """A tqdm bar over `iterable` (or updated by hand up to `total`); a silent one unless enabled."""
  return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
              disable=None if enabled else True)
