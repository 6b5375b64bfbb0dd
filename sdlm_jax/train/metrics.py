"""Training metrics: interval averaging, WORKDIR/metrics.jsonl and TensorBoard events.

metrics.jsonl holds one JSON object per logged step. On resume, lines past the restored
step are dropped first, so the file always describes exactly one run's history.
"""

import json
import math
import os

import jax
import numpy as np

from pallas_kernels import target

# Peak dense bf16 FLOP/s of GPUs by device kind (public spec sheets; TPU chips: pallas_kernels.target).
_GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def summarize(step_metrics: list[dict]) -> dict:
  """Averages a list of per-step metric dicts (host numpy values) into one flat dict.

  Per-t-bucket sums/counts become the mean loss of each bucket; arrays (e.g. per-expert
  load) are averaged elementwise and kept as lists.
  """
  out = {}
  keys = step_metrics[0].keys()
  for k in keys:
    if k.startswith("t_bucket"):
      continue
    values = np.stack([np.asarray(m[k], np.float64) for m in step_metrics])
    mean = values.mean(0)
    out[k] = mean.tolist() if mean.ndim else float(mean)
  if "t_bucket_loss_sum" in keys:
    sums = np.sum([m["t_bucket_loss_sum"] for m in step_metrics], axis=0)
    counts = np.sum([m["t_bucket_count"] for m in step_metrics], axis=0)
    num = len(sums)
    for i, (s, c) in enumerate(zip(sums, counts)):
      out[f"loss_t{i / num:.2f}-{(i + 1) / num:.2f}"] = float(s / c) if c else None
  return out


def peak_flops_per_device() -> float | None:
  """Peak bf16 FLOP/s of one local accelerator, for MFU; None where unknown (CPU)."""
  platform = jax.default_backend()
  if platform == "tpu":
    return target.chip().bf16_flops
  if platform == "gpu":
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in _GPU_PEAK_FLOPS.items() if name in kind), None)
  return None


def first_nonfinite(step_metrics: list[dict], keys=("total_loss", "grad_norm")) -> int | None:
  """Index of the first step where any of `keys` is NaN/Inf, or None."""
  for i, m in enumerate(step_metrics):
    if not all(math.isfinite(float(m[k])) for k in keys if k in m):
      return i
  return None


class MetricsWriter:
  """Writes metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **metrics}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
      elif k == "router/expert_load":  # one curve per expert (its share of routed slots, layer mean)
        for e, share in enumerate(v):
          self._tb.add_scalar(f"router/expert_load/{e:03d}", share, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
