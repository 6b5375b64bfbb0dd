"""Orbax checkpoints of everything a resume needs: params, optimizer state, data-iterator
state and metadata (step, RNG seed, data position), saved asynchronously and kept N deep.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}. `params` is its own item
so generation and evaluation restore it without the optimizer state.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdlm_jax import storage
from sdlm_jax.errors import InputNotFoundError


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


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with this project's items."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = storage.path(workdir) / "checkpoints"  # local or gs:// (orbax writes through tensorstore)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, params, opt_state, data_state: dict, meta: dict):
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

  def close(self):
    self._manager.close()
