"""load_pretrained: a model, its tokenizer and config back from an export directory.

Params come from `params/` (orbax) when the export has it, else from the safetensors files;
either way they are laid out on `mesh` (default: one device of this host) with the model's
logical-axis shardings, so a large export restores straight onto a pod slice's mesh.
"""

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sdlm_jax import storage
from sdlm_jax.data.tokenizer import Tokenizer
from sdlm_jax.defaults import get_base_config
from sdlm_jax.export import directory as directory_lib
from sdlm_jax.export import safetensors_io, tensor_names
from sdlm_jax.export.errors import ExportNotFoundError


def _merge(base: dict, saved: dict) -> dict:
  """`base` with every value `saved` has (recursively), plus the sections only `saved` has."""
  out = dict(base)
  for key, value in saved.items():
    out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
  return out


def config_of(saved: dict) -> ml_collections.ConfigDict:
  """A full config (the library defaults, overridden by the export's sections): what generation
  and evaluation read. Its `export` and `tokenizer` sections describe the export itself."""
  return ml_collections.ConfigDict(_merge(get_base_config().to_dict(), saved))


def _filled(abstract_params, pure: dict):
  """A copy of the abstract params State holding the arrays of `pure` (its nested-dict form)."""
  params = jax.tree.map(lambda x: x, abstract_params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def _params_from_safetensors(directory, abstract_params, model_cfg):
  template = nnx.to_pure_dict(abstract_params)
  tree = tensor_names.unflatten(safetensors_io.read(directory), template, model_cfg, np.stack)
  return _filled(abstract_params, jax.tree.map(
      lambda a, t: jax.device_put(np.asarray(a).astype(t.dtype), t.sharding), tree, template))


def _params_from_orbax(path, abstract_params):
  checkpointer = ocp.StandardCheckpointer()
  try:
    return _filled(abstract_params, checkpointer.restore(path, nnx.to_pure_dict(abstract_params)))
  finally:
    checkpointer.close()


def load_params(path, params, model_cfg):
  """The weights of export directory `path` laid out like `params` (an nnx.State of arrays:
  their shapes, dtypes and shardings): orbax params if the export has them, else safetensors.
  Raises ExportInputError naming a tensor the model needs that is missing or shaped otherwise."""
  directory = epath.Path(path)
  if (directory / directory_lib.PARAMS_DIR).exists():
    restored = _params_from_orbax(storage.path(path) / directory_lib.PARAMS_DIR, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params))
    return jax.tree.map(lambda a, t: a.astype(t.dtype), restored, params)
  if safetensors_io.exists(directory):
    return _params_from_safetensors(directory, params, model_cfg)
  raise ExportNotFoundError(f"{path}: neither {directory_lib.PARAMS_DIR}/ nor {safetensors_io.SINGLE_FILE} there; "
                            "expected a directory written by sdlm-export or sdlm-upcycle")


def load_config_and_tokenizer(path):
  """(config, tokenizer) of the export directory `path`, without its weights."""
  directory = epath.Path(path)
  cfg = config_of(directory_lib.read_config(directory))
  return cfg, Tokenizer.load(str(directory / cfg.tokenizer.file))


def load_pretrained(path, mesh=None):
  """(model, tokenizer, config) of the export directory `path` (written by sdlm-export)."""
  from sdlm_jax.train.restore import single_device_mesh  # pylint: disable=import-outside-toplevel
  from sdlm_jax.train.state import abstract_model  # pylint: disable=import-outside-toplevel
  directory = epath.Path(path)
  cfg, tokenizer = load_config_and_tokenizer(path)
  graphdef, params, rest = abstract_model(cfg, single_device_mesh() if mesh is None else mesh)
  if (directory / directory_lib.PARAMS_DIR).exists():
    params = _params_from_orbax(storage.path(path) / directory_lib.PARAMS_DIR, params)
  elif safetensors_io.exists(directory):
    params = _params_from_safetensors(directory, params, cfg.model)
  else:
    raise ExportNotFoundError(f"--model={path}: neither {directory_lib.PARAMS_DIR}/ nor "
                              f"{safetensors_io.SINGLE_FILE} there; export with --formats orbax or safetensors")
  return nnx.merge(graphdef, params, rest), tokenizer, cfg
