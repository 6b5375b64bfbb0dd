"""sdlm-train: train (or resume) an SDLM from a config file.

  sdlm-train --config configs/demo.py --workdir runs/demo
  sdlm-train --config configs/demo.py:tc --workdir runs/tc --config.train.num_steps=2000

An existing workdir is resumed from its latest checkpoint. On a multi-host TPU slice every
worker runs the same command with --distributed (launch/tpu/tpu.sh does this); for local
multi-process runs pass the coordinator explicitly:
  sdlm-train --distributed --coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=0 ...
"""

from absl import app, flags
from ml_collections import config_flags

from sdlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", common.DEMO_CONFIG, "Config file[:arg].", lock_config=True)
_WORKDIR = common.define_workdir("runs/demo")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (auto on TPU pods).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (auto on TPU pods).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from sdlm_jax.train import loop  # pylint: disable=import-outside-toplevel
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
