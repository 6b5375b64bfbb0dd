"""Orbax checkpoints of everything a resume needs: params, optimizer state, data-iterator
state and metadata (step, RNG seed, data position), saved asynchronously and kept N deep.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}. `params` is its own item
so generation and evaluation restore it without the optimizer state.
"""

import os

import jax
import orbax.checkpoint as ocp


def _abstract(tree):
  """Shape/dtype/sharding targets for a restore, taken from a live (initialised) tree."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager with this project's items."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
      raise FileNotFoundError(f"no checkpoint in {self.directory}; train first with sdlm-train")
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params))))
    return out["params"], step

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
