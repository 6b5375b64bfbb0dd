"""Config files, loaded by path: `configs/demo.py:tc,smoke` -> the ConfigDict its
`get_config("tc,smoke")` returns.

Config files are plain Python files that build on `sdlm_jax.defaults.get_base_config()` (and
`sdlm_jax.recipes` for the seed studies' setups). They are loaded by path, as the CLIs'
`--config` does, and never installed or imported as a package, so a user's own config file
anywhere on disk works exactly like the repository's.
"""

import hashlib
import importlib.util
import os
import types

import ml_collections

# The repository's configs/ folder (a source checkout, or an editable install).
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEMO = os.path.join(REPO_CONFIGS, "demo.py")


def load_module(path: str) -> types.ModuleType:
  """The config file at `path` as a module (a fresh module object per path)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  name = "sdlm_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def repo_module(name: str) -> types.ModuleType:
  """A config file of the repository by name: "demo", "openmoe2/ec_8b1b7a"."""
  return load_module(os.path.join(REPO_CONFIGS, f"{name}.py"))


def load(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> get_config(arg) of the file at path (get_config() without an arg)."""
  path, sep, arg = spec.partition(":")
  module = load_module(path)
  return module.get_config(arg) if sep else module.get_config()
