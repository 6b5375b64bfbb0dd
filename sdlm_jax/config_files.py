"""Config files, loaded by path: `configs/demo.py:tc,smoke` -> the ConfigDict its
`get_config("tc,smoke")` returns.

Config files are plain Python files that build on `sdlm_jax.defaults.get_base_config()` (and
`sdlm_jax.recipes` for the seed studies' setups). They are loaded by path, as the CLIs'
`--config` does, and never installed or imported as a package, so a user's own config file
anywhere on disk works exactly like the repository's.
"""

import difflib
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


def field_error(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why the dotted `path` names no field of `config` (the section, the close match, its
  fields), or None when it does: the check behind --config.a.b overrides and sdlm-sweep --set."""
  node, walked = config, []
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{'.'.join(walked)} is a value, not a config section"
    if key not in node:
      fields = sorted(node.keys())
      where = f"config section {'.'.join(walked)!r}" if walked else "the config"
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      return f"{where} has no field {key!r}{hint}; its fields: {', '.join(fields)}"
    node, walked = node[key], walked + [key]
  return None


def load(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` -> get_config(arg) of the file at path (get_config() without an arg)."""
  path, sep, arg = spec.partition(":")
  module = load_module(path)
  return module.get_config(arg) if sep else module.get_config()
