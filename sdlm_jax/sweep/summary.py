"""A sweep's summary table: DIR/summary.csv and DIR/summary.md, one row per run."""

import csv
import io

from sdlm_jax import storage

COLUMNS = ("run", "config", "status", "params_total", "params_active", "tokens", "epochs", "train_loss",
           "val_ppl", "tokens_per_sec", "wall_s")
HEADERS = ("run", "config", "status", "params (total)", "params (active)", "tokens", "epochs", "train loss",
           "val ppl", "tokens/s", "wall time")


def _human(value) -> str:
  for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{unit}"
  return f"{value:g}"


def _cell(column: str, value) -> str:
  if value is None:
    return "–"
  if column in ("params_total", "params_active", "tokens"):
    return _human(value)
  if column == "wall_s":
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes}m{seconds:02d}s"
  if column in ("train_loss", "epochs"):
    return f"{value:.3f}"
  if column in ("val_ppl", "tokens_per_sec"):
    return f"{value:,.1f}"
  return str(value)


def markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
  lines += ["| " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def write(rows: list[dict], out_dir) -> tuple[str, str]:
  """Writes summary.csv (raw values) and summary.md (rounded) into out_dir; returns their locations."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows({c: ("" if row[c] is None else row[c]) for c in COLUMNS} for row in rows)
  root = storage.path(out_dir)
  storage.write_text(root / "summary.csv", buffer.getvalue())
  storage.write_text(root / "summary.md", markdown(rows))
  return storage.location(root / "summary.csv"), storage.location(root / "summary.md")
