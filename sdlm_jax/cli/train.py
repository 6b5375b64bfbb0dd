"""sdlm-train: train (or resume) an SDLM from a config file.

  sdlm-train --config configs/demo.py --workdir runs/demo
  sdlm-train --config configs/demo.py:tc --workdir runs/tc --config.train.num_steps=2000

An existing workdir is resumed from its latest checkpoint.
"""

from absl import app
from ml_collections import config_flags

from sdlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", common.DEMO_CONFIG, "Config file[:arg].", lock_config=True)
_WORKDIR = common.define_workdir("runs/demo")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from sdlm_jax.train import loop  # pylint: disable=import-outside-toplevel
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
