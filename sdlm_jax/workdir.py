"""What a run directory holds besides checkpoints (sdlm_jax.train.restore reloads a model).

WORKDIR/config.json   the full resolved config (generation and evaluation rebuild from it)
WORKDIR/tokenizer.model  the sentencepiece model the run was trained with
WORKDIR/checkpoints/  orbax checkpoints (see sdlm_jax.train.checkpoint)
WORKDIR/metrics.jsonl, WORKDIR/tensorboard/, WORKDIR/eval.json
WORKDIR/lock.json     who is training in it now (sdlm_jax.train.run_lock)

config.json is written once, by the run's first start; a resume only appends to its `history`
list the fields it was allowed to change (sdlm_jax.train.resume_rules), and the config a run
trains with now is the stored one with that history applied (`stored_config`).

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
  """The first start's tokenizer.model, then config.json (which marks the run as started)."""
  storage.path(workdir).mkdir(parents=True, exist_ok=True)
  target = storage.path(workdir) / TOKENIZER_FILE
  if storage.location(tokenizer.model_path) != str(target):
    storage.copy_file(tokenizer.model_path, target)
  write_json(workdir, CONFIG_FILE, cfg.to_dict())


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


HISTORY = "history"


def has_config(workdir: str) -> bool:
  return (storage.path(workdir) / CONFIG_FILE).exists()


def read_config_file(workdir: str) -> dict:
  """config.json as stored: the first start's config plus its `history` list of resume changes."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise InputNotFoundError(f"{path} not found: is {workdir!r} a directory written by sdlm-train?")
  return json.loads(path.read_text())


def _set_field(tree: dict, field: str, value):
  *sections, key = field.split(".")
  for name in sections:
    tree = tree.setdefault(name, {})
  tree[key] = value


def stored_config(saved: dict) -> dict:
  """The config a run trains with now: the stored fields (completed for older runs) with every
  change of its history applied in order."""
  fields = {k: v for k, v in saved.items() if k != HISTORY}
  out = _fill_missing(fields, get_base_config().to_dict())
  for entry in saved.get(HISTORY, []):
    for field, change in entry["changes"].items():
      _set_field(out, field, change["new"])
  return out


def append_history(workdir: str, entry: dict):
  """Adds one resume's changes to config.json's history; the stored fields stay as they are."""
  saved = read_config_file(workdir)
  saved[HISTORY] = saved.get(HISTORY, []) + [entry]
  write_json(workdir, CONFIG_FILE, saved)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config; fields added since it was written get their old meaning."""
  return ml_collections.ConfigDict(stored_config(read_config_file(workdir)))


def load_tokenizer(workdir: str):
  return Tokenizer.load(str(storage.path(workdir) / TOKENIZER_FILE))
