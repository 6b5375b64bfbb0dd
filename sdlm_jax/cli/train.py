"""sdlm-train: train (or resume) an SDLM from a config file.

  sdlm-train --config configs/demo.py --workdir runs/demo
  sdlm-train --config configs/demo.py:tc --workdir runs/tc --config.train.num_steps=2000

An existing workdir is resumed from its latest checkpoint. Its stored config.json is authoritative:
a changed model, tokenizer, data or routing field stops the command before anything is written;
num_steps and the log/eval/checkpoint cadence may change; optimizer fields only when listed:
  sdlm-train --workdir runs/demo --config.train.optimizer.lr=1e-3 --allow_changed=train.optimizer.lr
 On a multi-host TPU slice every
worker runs the same command with --distributed (launch/tpu/tpu.sh does this); for local
multi-process runs pass the coordinator explicitly:
  sdlm-train --distributed --coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id=0 ...
"""

import os
import sys
import threading

from absl import app, flags

from sdlm_jax import config_files
from sdlm_jax.cli import common

PROG = "sdlm-train"
# jax's own initialization timeout ends the process with a C++ fatal error and no hint;
# it is set this much later than --distributed_timeout so that the watchdog speaks first.
_JAX_TIMEOUT_GRACE_S = 10

_CONFIG = common.define_config(config_files.DEMO)
_WORKDIR = common.define_workdir("runs/demo")
_ALLOW_CHANGED = flags.DEFINE_list(
    "allow_changed", [], "Fields this resume may change from the run's stored config.json: "
    "train.optimizer.*, train.grad_accum_steps, diffusion.* (comma-separated names, recorded in its history).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (auto on TPU pods).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (auto on TPU pods).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait, with --distributed, for every process to join the "
    "coordinator; past it the command stops with an error saying what to check.", lower_bound=1)


def _stop(message: str):
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access  # the main thread is blocked inside jax's connect


def initialize_distributed(coordinator_address, num_processes, process_id, timeout_s: int):
  """jax.distributed.initialize, or one line and exit status 2 if the processes do not all join in time.

  Past its timeout jax aborts the process from C++ (no exception to catch), so a watchdog
  thread ends it first. With --debug, jax's own error is shown instead.
  """
  import jax  # pylint: disable=import-outside-toplevel
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if common.debug_requested():
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    return
  where = f"the coordinator {coordinator_address}" if coordinator_address else "the auto-detected coordinator"
  message = (f"{PROG}: error: not all {num_processes or 'expected'} processes joined {where} within "
             f"--distributed_timeout={timeout_s} s: check that process 0 runs on that host and port, that every "
             "process passes the same --coordinator_address and --num_processes and its own --process_id, and "
             "that the port is reachable from here")
  watchdog = threading.Timer(timeout_s, _stop, (message,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s + _JAX_TIMEOUT_GRACE_S)
  finally:
    watchdog.cancel()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  if _DISTRIBUTED.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)
  from sdlm_jax.train import loop  # pylint: disable=import-outside-toplevel
  result = loop.train(_CONFIG.value, _WORKDIR.value, allow_changed=tuple(_ALLOW_CHANGED.value))
  print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)))


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
