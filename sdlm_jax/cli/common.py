"""Flags shared by the command-line entry points."""

import os

from absl import flags, logging

# The repo's configs/ folder (present in a source checkout and with `pip install -e .`).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.py")


def define_workdir(default=None, required=False):
  return flags.DEFINE_string("workdir", default, "Run directory: checkpoints, metrics, config.", required=required)


def quiet_logs():
  """orbax and grain log every checkpoint operation at INFO; keep the console readable."""
  logging.set_verbosity(logging.WARNING)
