"""What a resume may change: the run directory's stored config is authoritative.

A field that alters what the checkpoint means (the model and its routing, the tokenizer, the
data and its order, the seed, the batch) can never change on resume: the run stops before
anything is written and names each such field with its stored and new value. Fields that only
say how long and how often (num_steps, log/eval/checkpoint cadence, evaluation, sampling
defaults, the device mesh, the local data cache) change freely; the optimizer, gradient
accumulation and the diffusion objective change only when named in `--allow_changed`. Every
change made is recorded in config.json's history (sdlm_jax.workdir.append_history).
docs/run_directories.md has the table of fields.
"""

import json
import time

from sdlm_jax import storage
from sdlm_jax import workdir as workdir_lib
from sdlm_jax.errors import UserInputError

# A field matches an entry equal to it, or an entry ending in "." that starts it.
SAFE = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.eval_every", "train.init_from", "eval.", "sample.", "mesh.", "data.data_dir")
NEEDS_ALLOW = ("train.optimizer.", "train.grad_accum_steps", "diffusion.")


class ResumeConfigError(UserInputError):
  """The new config changes a field the stored run does not allow to change."""


def _matches(field: str, entries) -> bool:
  return any(field == e or (e.endswith(".") and field.startswith(e)) for e in entries)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_fields(stored: dict, new: dict) -> dict:
  """{field: (stored value, new value)} for every leaf that differs (JSON values compared)."""
  a, b = _flatten(stored), _flatten(json.loads(json.dumps(new)))
  return {f: (a.get(f), b.get(f)) for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)}


def check(stored: dict, new: dict, allow_changed=(), *, step: int = 0) -> dict | None:
  """The history entry for the allowed changes from `stored` to `new` (None: nothing changed),
  or a ResumeConfigError naming every field that may not change."""
  changes = changed_fields(stored, new)
  for field in allow_changed:
    if not _matches(field, NEEDS_ALLOW):
      allowed = ", ".join(e + "*" if e.endswith(".") else e for e in NEEDS_ALLOW)
      raise ResumeConfigError(f"--allow_changed={field}: only these fields need (and accept) it: {allowed}")
  locked = {f: c for f, c in changes.items() if not _matches(f, SAFE + NEEDS_ALLOW)}
  unallowed = {f: c for f, c in changes.items() if _matches(f, NEEDS_ALLOW) and f not in allow_changed}
  if locked or unallowed:
    parts = []
    if locked:
      parts.append("these fields cannot change on resume (start a new run in another --workdir): "
                   + "; ".join(f"{f}: stored {a!r}, new {b!r}" for f, (a, b) in locked.items()))
    if unallowed:
      parts.append("these change only with --allow_changed=" + ",".join(unallowed) + ": "
                   + "; ".join(f"{f}: stored {a!r}, new {b!r}" for f, (a, b) in unallowed.items()))
    raise ResumeConfigError("the run directory's config.json is authoritative on resume; " + ". ".join(parts))
  if not changes:
    return None
  return {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "changes": {f: {"old": a, "new": b} for f, (a, b) in changes.items()}}


def check_workdir(workdir: str, cfg, allow_changed=(), *, step: int = 0) -> dict | None:
  """`check` against the run directory's stored config (with its history applied)."""
  return check(workdir_lib.stored_config(workdir_lib.read_config_file(workdir)), cfg.to_dict(), allow_changed,
               step=step)


def check_tokenizer(workdir: str, tokenizer):
  """The tokenizer the data config gives must be the run's own tokenizer.model, byte for byte."""
  stored = storage.path(workdir) / workdir_lib.TOKENIZER_FILE
  if storage.path(tokenizer.model_path).read_bytes() != stored.read_bytes():
    raise ResumeConfigError(f"the tokenizer the data config gives ({tokenizer.model_path}) differs from the run's "
                            f"{stored}; resume with the data.* fields the run was started with")
