"""sdlm_jax: sparse (MoE) diffusion language models in JAX / Flax NNX."""

from sdlm_jax import storage as _storage

_storage.configure_emulator()  # STORAGE_EMULATOR_HOST -> gcsfs and tensorstore, before either is used


def load_pretrained(path, mesh=None):
  """(model, tokenizer, config) of a directory written by sdlm-export; see sdlm_jax.export.pretrained.

  Imported on first call, so `import sdlm_jax` stays light.
  """
  from sdlm_jax.export.pretrained import load_pretrained as load  # pylint: disable=import-outside-toplevel
  return load(path, mesh)
