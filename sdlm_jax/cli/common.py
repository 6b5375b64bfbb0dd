"""Flags shared by the command-line entry points."""

from absl import flags, logging

from sdlm_jax.config_files import DEMO as DEMO_CONFIG  # noqa: F401 (sdlm-train's default --config)


def define_workdir(default=None, required=False):
  return flags.DEFINE_string("workdir", default, "Run directory: checkpoints, metrics, config.", required=required)


def quiet_logs():
  """orbax and grain log every checkpoint operation at INFO; keep the console readable."""
  logging.set_verbosity(logging.WARNING)
