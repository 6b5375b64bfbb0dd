"""A trained model back from a run directory, for generation, evaluation and export."""

import jax
from flax import nnx

from sdlm_jax import workdir as workdir_lib
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.parallel.rules import MESH_AXES
from sdlm_jax.train.checkpoint import Checkpointer
from sdlm_jax.train.state import abstract_model


def single_device_mesh() -> jax.sharding.Mesh:
  """A mesh of this host's first device, every axis of size 1: restores any run's params whole,
  whatever mesh (and however many hosts) trained it."""
  sizes = {a: 1 for a in MESH_AXES} | {f"dcn_{a}": 1 for a in MESH_AXES}
  return make_mesh(sizes, jax.devices()[:1])


def restore_run(workdir: str, step=None, mesh=None):
  """(cfg, tokenizer, graphdef, params, rest, step): the params of checkpoint `step` (None: the
  latest) laid out on `mesh` (None: the run's own mesh config over this host's devices)."""
  cfg = workdir_lib.load_config(workdir)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  graphdef, params, rest = abstract_model(cfg, make_mesh(cfg.mesh) if mesh is None else mesh)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  try:
    params, step = ckpt.restore_params(params, step)
  finally:
    ckpt.close()
  return cfg, tokenizer, graphdef, params, rest, step


def load_trained_model(workdir: str, step=None, mesh=None):
  """(cfg, tokenizer, model with the checkpoint's params, step); `step` None: the latest."""
  cfg, tokenizer, graphdef, params, rest, step = restore_run(workdir, step, mesh)
  return cfg, tokenizer, nnx.merge(graphdef, params, rest), step
