"""A trained model back from a run directory, for generation and evaluation."""

from flax import nnx

from sdlm_jax import workdir as workdir_lib
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.train.checkpoint import Checkpointer
from sdlm_jax.train.state import abstract_model


def load_trained_model(workdir: str, step=None):
  """(cfg, tokenizer, model with the checkpoint's params, step); `step` None: the latest."""
  cfg = workdir_lib.load_config(workdir)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  graphdef, params, rest = abstract_model(cfg, make_mesh(cfg.mesh))
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  params, step = ckpt.restore_params(params, step)
  ckpt.close()
  return cfg, tokenizer, nnx.merge(graphdef, params, rest), step
