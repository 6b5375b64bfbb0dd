"""What a run directory holds besides checkpoints (sdlm_jax.train.restore reloads a model).

WORKDIR/config.json   the full resolved config (generation and evaluation rebuild from it)
WORKDIR/tokenizer.model  the sentencepiece model the run was trained with
WORKDIR/checkpoints/  orbax checkpoints (see sdlm_jax.train.checkpoint)
WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/eval.json

WORKDIR is a local directory or a gs:// URL (sdlm_jax.storage); every file here goes through it.
"""

import json

import ml_collections

from sdlm_jax.data.tokenizer import Tokenizer
from sdlm_jax import storage
from sdlm_jax.defaults import get_base_config
from sdlm_jax.errors import InputNotFoundError

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"


def write_json(workdir: str, name: str, obj) -> str:
  """Writes WORKDIR/name whole (never a partial file); returns its location."""
  path = storage.path(workdir) / name
  storage.write_text(path, json.dumps(obj, indent=2))
  return str(path)


def save_run_files(workdir: str, cfg, tokenizer):
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  write_json(workdir, CONFIG_FILE, cfg.to_dict())
  target = storage.path(workdir) / TOKENIZER_FILE
  if storage.location(tokenizer.model_path) != str(target):
    storage.copy_file(tokenizer.model_path, target)


# Fields added after run directories were first written, with the value that reproduces
# how such a run was trained (its checkpoint layout depends on them).
_FIELDS_OF_OLDER_RUNS = {("model", "scan_layers"): False, ("model", "remat"): "none"}


def _fill_missing(saved: dict, defaults: dict, path=()) -> dict:
  """`saved` with every field it lacks taken from the older-run table or the base defaults."""
  out = dict(saved)
  for key, default in defaults.items():
    if isinstance(default, dict):
      out[key] = _fill_missing(saved.get(key, {}), default, path + (key,))
    elif key not in saved:
      out[key] = _FIELDS_OF_OLDER_RUNS.get(path + (key,), default)
  return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config; fields added since it was written get their old meaning."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise InputNotFoundError(f"{path} not found: is {workdir!r} a directory written by sdlm-train?")
  saved = json.loads(path.read_text())
  return ml_collections.ConfigDict(_fill_missing(saved, get_base_config().to_dict()))


def load_tokenizer(workdir: str):
  return Tokenizer.load(str(storage.path(workdir) / TOKENIZER_FILE))
