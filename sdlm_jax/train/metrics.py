"""Training metrics: interval averaging, WORKDIR/metrics.jsonl and TensorBoard events.

metrics.jsonl holds one JSON object per logged step. On resume, lines past the restored
step are dropped first, so the file always describes exactly one run's history; a line that is
not whole JSON (torn by a crash mid-write) is dropped with a warning.

On a gs:// work dir (objects there cannot be appended to, and tensorboardX writes local files
only) both are written to a local staging folder and copied up by `sync()`, which the train
loop calls before every checkpoint save and at the end: whatever a resume keeps (every line up
to the restored checkpoint's step) is in the bucket before that checkpoint exists; a write also
syncs when the last sync is SYNC_SECONDS old, so TensorBoard on the bucket follows a run whose
checkpoints are far apart. A sync uploads only the bytes each staged file gained since the last
one and composes them onto the end of its object (`storage.append_bytes`), so a long run's syncs
cost its metrics' size once, not once per sync. (tensorboardX writes events from a thread of its
own, so the bucket's event file may end mid-record until the next sync: TensorBoard reads up to
the last whole record; `close()` drains it and syncs last.)
"""

import json
import math
import shutil
import sys
import tempfile
import time
import uuid

import jax
import numpy as np

from pallas_kernels import target
from sdlm_jax import storage

# Peak dense bf16 FLOP/s of GPUs by device kind (public spec sheets; TPU chips: pallas_kernels.target).
_GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SYNC_SECONDS = 60.0  # gs:// work dir: the longest a logged metric waits before it is in the bucket


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


def first_nonfinite(step_metrics: list[dict], keys=("total_loss", "grad_norm", "param_norm")) -> int | None:
  """Index of the first step where any of `keys` is NaN/Inf, or None."""
  for i, m in enumerate(step_metrics):
    if not all(math.isfinite(float(m[k])) for k in keys if k in m):
      return i
  return None


class MetricsWriter:
  """Writes metric dicts to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.workdir = storage.path(workdir)
    self._remote = storage.is_remote(self.workdir)
    # Where the files are written: the work dir itself, or a local staging folder for gs://.
    self._local = (storage.path(tempfile.mkdtemp(prefix="sdlm-metrics-")) if self._remote and enabled
                   else self.workdir)
    self.path = str(self._local / "metrics.jsonl")
    self._tb = None
    self._synced = {}  # staged file -> bytes of it already in the bucket (gs:// only)
    self._last_sync = time.monotonic()
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # On gs:// each writer's event file gets a name of its own: a staged file is appended to the
    # object of the same name, which a writer started in the same second would otherwise share.
    suffix = f".{uuid.uuid4().hex[:8]}" if self._remote else ""
    # purge_step: TensorBoard drops the earlier event files' points past the restored step, which a
    # killed run logged before its last checkpoint and this run logs again.
    self._tb = SummaryWriter(str(self._local / "tensorboard"), filename_suffix=suffix,
                             purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int):
    source = self.workdir / "metrics.jsonl"
    if not source.exists():
      return
    kept = []
    for number, line in enumerate(source.read_text().splitlines(keepends=True), 1):
      try:
        record = json.loads(line) if line.strip() else None
      except json.JSONDecodeError:  # a line torn by a crash mid-write: it was never a whole record
        sys.stderr.write(f"warning: {source} line {number} is not a whole JSON record (a write cut short); "
                         f"dropped: {line.strip()[:80]!r}\n")
        continue
      if record is not None and record["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    text = "".join(kept)
    storage.write_text(self.path, text)
    if self._remote:
      storage.write_text(source, text)
      self._synced[self.path] = len(text.encode("utf-8"))  # the bucket holds all of it

  def sync(self):
    """Copies the staged metrics.jsonl and TensorBoard files up to a gs:// work dir (locally: nothing to do)."""
    if not (self.enabled and self._remote):
      return
    self._last_sync = time.monotonic()
    if self._tb is not None:
      self._tb.flush()
    if storage.path(self.path).exists():
      self._append_new_bytes(self.path, self.workdir / "metrics.jsonl")
    events = self._local / "tensorboard"
    for event_file in sorted(events.iterdir()) if events.exists() else ():
      self._append_new_bytes(str(event_file), self.workdir / "tensorboard" / event_file.name)

  def _append_new_bytes(self, local: str, remote):
    """Appends to `remote` what the staged file `local` gained since the last sync."""
    done = self._synced.get(local, 0)
    with open(local, "rb") as f:
      f.seek(done)
      new = f.read()
    if new:
      storage.append_bytes(remote, new)
      self._synced[local] = done + len(new)

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
    if self._remote and time.monotonic() - self._last_sync >= SYNC_SECONDS:
      self.sync()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self.sync()
      if self._remote:
        shutil.rmtree(self._local, ignore_errors=True)
