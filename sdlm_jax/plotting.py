"""matplotlib, imported on first use with the Agg backend (files only, no display), and PNG saving.

Only the modules that draw (scaling fits, sweeps, run plots) import it, so training and the
other commands start without paying for matplotlib's import.
"""

import io

from sdlm_jax import storage


def pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig, path: str) -> str:
  """Writes `fig` as a PNG at `path` (local or gs://, folders created) and closes it; returns the path."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  pyplot().close(fig)
  storage.write_bytes(path, png.getvalue())
  return path
