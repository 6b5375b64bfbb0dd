"""What a finished or partial run directory says about its run: the records a sweep compares.

Reads WORKDIR/config.json, metrics.jsonl (training lines and `val/*` lines) and eval.json,
local or gs://; a torn or unparsable metrics line is skipped, so a run killed mid-write still
reads. Nothing here needs jax.
"""

import dataclasses
import json
import math
import statistics

import ml_collections

from sdlm_jax import storage, workdir as workdir_lib
from sdlm_jax.scaling.flops import param_counts

RUN_RECORD = "sweep_run.json"  # written by sdlm-sweep beside the run's own files: command, status, wall time


@dataclasses.dataclass
class RunRecords:
  """One run directory's config and metric lines."""
  workdir: str
  config: ml_collections.ConfigDict
  train: list[dict]        # metrics.jsonl lines of training steps
  val: list[dict]          # metrics.jsonl lines with val/* (periodic and final evaluations)
  final_eval: dict | None  # eval.json
  sweep: dict | None       # sweep_run.json, when sdlm-sweep ran it

  @property
  def num_steps(self) -> int:
    return int(self.config.train.num_steps)

  @property
  def tokens_per_step(self) -> int:
    return int(self.config.train.batch_size) * int(self.config.data.seq_len)

  @property
  def last_step(self) -> int:
    return max((int(m["step"]) for m in self.train), default=0)

  @property
  def finished(self) -> bool:
    """Trained to its num_steps and evaluated at the end."""
    return (self.final_eval is not None and self.last_step >= self.num_steps
            and int(self.final_eval.get("step", -1)) >= self.num_steps)

  def epoch_at(self, step: int) -> float | None:
    """Epochs of training data seen by `step`, or None where no training line logs epochs.

    Every step takes the same number of tokens, so epochs grow in proportion to steps: the
    value is the nearest logged line's, scaled (exact at a logged step). Evaluations every
    epoch fall between the logged lines (train.log_every)."""
    logged = [(int(m["step"]), m["epoch"]) for m in self.train if m.get("epoch") is not None and m["step"] > 0]
    if not logged:
      return None
    near_step, near_epoch = min(logged, key=lambda point: abs(point[0] - step))
    return near_epoch * step / near_step

  @property
  def is_moe(self) -> bool:
    return int(self.config.model.moe.num_experts) > 0


def _read_json(path):
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except json.JSONDecodeError:
    return None


def _metric_lines(path) -> list[dict]:
  if not path.exists():
    return []
  lines = []
  for text in path.read_text().splitlines():
    try:
      record = json.loads(text)
    except json.JSONDecodeError:
      continue  # a line torn by a kill
    if isinstance(record, dict) and "step" in record:
      lines.append(record)
  return lines


def read(workdir) -> RunRecords | None:
  """The run directory's records, or None where it holds no config.json (never started)."""
  root = storage.path(workdir)
  if not (root / workdir_lib.CONFIG_FILE).exists():
    return None
  config = workdir_lib.load_config(workdir)
  lines = _metric_lines(root / "metrics.jsonl")
  train = [m for m in lines if "loss" in m]
  val = [m for m in lines if any(k.startswith("val/") for k in m)]
  return RunRecords(workdir=storage.location(root), config=config, train=train, val=val,
                    final_eval=_read_json(root / "eval.json"), sweep=_read_json(root / RUN_RECORD))


def val_ppl(record: dict) -> float | None:
  """A validation line's perplexity: the ELBO bound of a diffusion model, the exact one of an AR model."""
  value = record.get("val/ppl_bound", record.get("val/ppl"))
  return _finite(value)


def _finite(value) -> float | None:
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summary_row(name: str, spec: str, run: RunRecords) -> dict:
  """One row of a sweep's summary table (None where the run has not produced the value yet)."""
  counts = param_counts(run.config.model)
  last = run.train[-1] if run.train else {}
  speeds = [m["tokens_per_sec"] for m in run.train[1:] if _finite(m.get("tokens_per_sec"))]
  final = run.final_eval or (run.val[-1] if run.val else {})
  return {
      "run": name,
      "config": spec,
      "status": "finished" if run.finished else f"step {run.last_step}/{run.num_steps}",
      "params_total": counts["total"],
      "params_active": counts["active"],
      "tokens": run.last_step * run.tokens_per_step,
      "epochs": _finite(last.get("epoch")),
      "train_loss": _finite(last.get("loss")),
      "val_ppl": val_ppl(final),
      "tokens_per_sec": statistics.median(speeds) if speeds else None,
      "wall_s": _finite((run.sweep or {}).get("wall_s")),
  }
