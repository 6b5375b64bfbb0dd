"""--workdir / --model / --step: where sdlm-generate and sdlm-eval take their model from.

Exactly one of --workdir (a run directory; --step picks a checkpoint, default the latest) and
--model (a directory written by sdlm-export, which holds one step). Bad input raises a
UserInputError, which the entry points print as one line with exit status 2.
"""

from absl import flags

from sdlm_jax.cli import common
from sdlm_jax.errors import UserInputError

_WORKDIR = common.define_workdir()
flags.declare_key_flag("workdir")  # defined in common: listed with this module's flags
_MODEL = flags.DEFINE_string("model", None, "Export directory written by sdlm-export (instead of --workdir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir to load (default: the latest).")


def directory() -> str:
  """The directory the model came from: where results such as eval.json are written."""
  return _WORKDIR.value if _WORKDIR.value is not None else _MODEL.value


def _check_choice():
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise UserInputError("give exactly one of --workdir (a run directory) and --model (a directory written by "
                         "sdlm-export)")
  if _MODEL.value is not None and _STEP.value is not None:
    raise UserInputError(f"--step={_STEP.value} goes with --workdir; an export holds one step (its config.json's "
                         "export.step)")


def load_config():
  """(cfg, tokenizer) of --workdir or --model, without reading any weights: flags are checked
  against them before a checkpoint is read."""
  _check_choice()
  if _MODEL.value is not None:
    from sdlm_jax.export.pretrained import load_config_and_tokenizer  # pylint: disable=import-outside-toplevel
    return load_config_and_tokenizer(_MODEL.value)
  from sdlm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from sdlm_jax.export.directory import check_workdir  # pylint: disable=import-outside-toplevel
  check_workdir(_WORKDIR.value)
  return workdir_lib.load_config(_WORKDIR.value), workdir_lib.load_tokenizer(_WORKDIR.value)


def load():
  """(cfg, tokenizer, model, step) from --workdir [--step] or --model."""
  _check_choice()
  if _MODEL.value is not None:
    from sdlm_jax.export.pretrained import load_pretrained  # pylint: disable=import-outside-toplevel
    model, tokenizer, cfg = load_pretrained(_MODEL.value)
    return cfg, tokenizer, model, cfg.export.step
  from sdlm_jax.export.directory import check_workdir  # pylint: disable=import-outside-toplevel
  from sdlm_jax.train import restore  # pylint: disable=import-outside-toplevel
  check_workdir(_WORKDIR.value)
  return restore.load_trained_model(_WORKDIR.value, _STEP.value)
