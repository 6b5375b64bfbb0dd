"""Orbax checkpoints of everything a resume needs: params, optimizer state, data-iterator
state and metadata (step, RNG seed, data position), saved asynchronously and kept N deep.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}. `params` is its own item
so generation and evaluation restore it without the optimizer state.

Integrity: orbax's default format keeps no checksum of the array data, so once a step is
finalized process 0 records a digest of every file of it in <step>/checksums.json (sha256
locally; on gs:// the object's crc32c, read without a download). A resume checks them before
restoring; a checkpoint that fails the check or the restore is moved to
WORKDIR/checkpoints_corrupt/<step> with a warning, and the previous one is tried
(docs/run_directories.md).
"""

import json
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdlm_jax import storage
from sdlm_jax.errors import InputNotFoundError, UserInputError

CHECKSUMS_FILE = "checksums.json"
CORRUPT_DIR = "checkpoints_corrupt"


def _abstract(tree):
  """Shape/dtype/sharding targets for a restore, taken from a live (initialised) tree."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def gather_process_states(state: dict) -> list:
  """Every process's (small, JSON-able) data-iterator state, in process order, on every process.

  Each process reads its own shard of the data, so a checkpoint must keep all of their
  positions; orbax writes JSON items from the primary process only, hence the all-gather.
  """
  if jax.process_count() == 1:
    return [state]
  raw = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  gathered = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
  return [json.loads(bytes(row[:int(n)]).decode("utf-8")) for row, n in zip(gathered, np.ravel(lengths))]


def own_process_state(saved: dict) -> dict:
  """This process's entry of a saved data state (see gather_process_states)."""
  states = saved["per_process"]
  if len(states) != jax.process_count():
    raise ValueError(f"checkpoint holds data positions for {len(states)} processes, this run has "
                     f"{jax.process_count()}; resume with the same number of processes")
  return states[jax.process_index()]


def agreed_latest_step(ckpt) -> int:
  """The step to resume from (0: start fresh), the same on every process, or an error.

  Every process must see the same checkpoints (the run directory is shared); one that sees
  another latest step would restore a different state and the job would diverge silently.
  """
  step = ckpt.latest_step() or 0
  if jax.process_count() == 1:
    return step
  steps = np.ravel(multihost_utils.process_allgather(np.array([step], np.int64)))
  if len(set(steps.tolist())) != 1:
    raise RuntimeError(
        f"processes see different latest checkpoints in {ckpt.directory} (per process: {steps.tolist()}); "
        "the run directory must be one shared path that every worker sees")
  return step


class CheckpointNotFoundError(InputNotFoundError):
  """The requested checkpoint step does not exist in the run directory."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files differ from the digests recorded when it was written."""


class NoUsableCheckpointError(UserInputError):
  """Every checkpoint of the run directory failed to restore."""


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (each must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(err: Exception) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with this project's items."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = storage.path(workdir) / "checkpoints"  # local or gs:// (orbax writes through tensorstore)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))
    self._unrecorded = None  # the step saved last, until its checksums are written

  def latest_step(self):
    return self._manager.latest_step()

  def _record_checksums(self):
    """Writes checksums.json of the last saved step once its save has finished (process 0)."""
    step, self._unrecorded = self._unrecorded, None
    if step is None or jax.process_index() != 0 or step not in self._manager.all_steps():
      return
    step_dir = self.directory / str(step)
    digests = {str(f.relative_to(step_dir)): storage.digest(f) for f in storage.files_under(step_dir)
               if f.name != CHECKSUMS_FILE}
    storage.write_text(step_dir / CHECKSUMS_FILE, json.dumps(digests, indent=1, sort_keys=True))

  def poll(self):
    """Cheap, every step: records the checksums of a save that has finished in the background."""
    if self._unrecorded is not None and not self._manager.is_saving_in_progress():
      self._record_checksums()

  def verify(self, step: int):
    """Raises CorruptCheckpointError if a file of checkpoint `step` differs from its recorded digest
    (a checkpoint without checksums.json, written before they were recorded, passes)."""
    step_dir = self.directory / str(step)
    record = step_dir / CHECKSUMS_FILE
    if not record.exists():
      return
    for name, expected in json.loads(record.read_text()).items():
      f = step_dir / name
      if not f.exists():
        raise CorruptCheckpointError(f"{f} is missing")
      if storage.digest(f) != expected:
        raise CorruptCheckpointError(f"{f} differs from the digest recorded when it was written "
                                     "(truncated or altered)")

  def restore_latest(self, params, opt_state):
    """(step, params, opt_state, data, meta) of the newest checkpoint that verifies and restores.

    Each newer one that fails is moved to WORKDIR/checkpoints_corrupt/<step> with a warning naming
    what failed (kept for inspection; the run then saves that step again).
    """
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        self.verify(step)
        out = self.restore(step, params, opt_state)
        error = None
      except Exception as err:  # pylint: disable=broad-except  # any failure: try the previous checkpoint
        error = err
      if _all_processes(error is None):
        return (step, *out)
      failures.append(f"step {step}: {_first_line(error) if error else 'failed on another process'}")
      aside = self.directory.parent / CORRUPT_DIR / str(step)
      if aside.exists():  # the same step failed before: keep both
        aside = aside.parent / f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
      sys.stderr.write(f"warning: checkpoint {step} in {self.directory} could not be restored "
                       f"({failures[-1]}); moved to {aside}, trying the previous one\n")
      sys.stderr.flush()
      if jax.process_index() == 0:
        storage.move_tree(self.directory / str(step), aside)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"sdlm_checkpoint_set_aside_{step}")
      self._manager.reload()
    raise NoUsableCheckpointError(f"no checkpoint in {self.directory} restores ({'; '.join(failures)}); the "
                                  f"failed ones are in {self.directory.parent / CORRUPT_DIR}: restore a good copy "
                                  "there, or start a new run in another --workdir")

  def save(self, step: int, params, opt_state, data_state: dict, meta: dict):
    if self._unrecorded is not None:  # orbax waits for the previous save anyway
      self._manager.wait_until_finished()
      self._record_checksums()
    self._unrecorded = step
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, params, opt_state):
    """Restores onto the structure, shapes and shardings of the given live trees."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params)),
        opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["params"], out["opt_state"], out["data"], out["meta"]

  def restore_params(self, params, step=None):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointNotFoundError(f"no checkpoint in {self.directory}; train first with sdlm-train")
    saved = sorted(self._manager.all_steps())
    if step not in saved:
      raise CheckpointNotFoundError(f"--step={step}: no checkpoint of that step in {self.directory}; allowed "
                                    f"values: {', '.join(map(str, saved)) or 'none (train first with sdlm-train)'}")
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params))))
    return out["params"], step

  def wait(self):
    self._manager.wait_until_finished()
    self._record_checksums()

  def close(self):
    self._manager.close()
