"""sdlm-aot: will this config fit a TPU slice, and how fast should it run? (on a CPU machine)

  sdlm-aot --config configs/openmoe2/dense_1b7.py --topology v5p-128
  sdlm-aot --config configs/openmoe2/ec_8b1b7a.py --topology v6e-64 --config.train.batch_size=512
  sdlm-aot --config configs/openmoe2/dense_8b.py --topology v5p-64 --num_slices 2 --noestimate

Compiles the real train step for the slice through libtpu (`pip install -e ".[tpu]"`) and
prints HBM per chip, compiled vs analytic FLOPs, XLA's estimated step time with its MFU and
tokens/s/chip, and the collectives (see sdlm_jax/aot.py). Exits with status 1 and says why
when the config does not fit the slice's HBM, or is invalid for it (e.g. a batch the mesh
cannot split), or libtpu cannot load (another process holding its lock is named). A bad
command line (unknown flag or config field, missing config file) is one line, status 2.
--noestimate skips the step-time estimate (a few more compiles).
"""

import os
import sys

# Compiling for a topology needs libtpu but no TPU: keep jax itself on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
from absl import app, flags

from sdlm_jax.cli import common
from sdlm_jax.cli import libtpu_lock

PROG = "sdlm-aot"

_CONFIG = common.define_config()
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: an accelerator type (v5p-128, v6e-64, v5litepod-16, "
                                "v4-32) or a topology (v5p:4x4x4).", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice over DCN).")
_ESTIMATE = flags.DEFINE_bool("estimate", True, "Also estimate the step time (XLA cost model).")


_ADVICE = "(try a smaller train.batch_size, model.remat='full', more chips, or a larger mesh.fsdp)"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/openmoe2/dense_1b7.py")
  common.quiet_logs()
  from sdlm_jax import aot  # pylint: disable=import-outside-toplevel
  try:
    tpu_slice = aot.parse_slice(_TOPOLOGY.value, _NUM_SLICES.value)
  except ValueError as err:
    sys.exit(f"sdlm-aot: {err}")
  try:
    devices = aot.slice_devices(tpu_slice)
  except (RuntimeError, ImportError) as err:
    if libtpu_lock.is_lock_error(str(err)):
      sys.exit(f"sdlm-aot: {libtpu_lock.explain(libtpu_lock.LOCK_FILE, libtpu_lock.holders())}")
    sys.exit(f"sdlm-aot: libtpu could not describe {tpu_slice.topology}: {err}\n"
             "(compiling for TPU needs libtpu: pip install -e \".[tpu]\")")
  print(f"compiling the train step for {tpu_slice.name} ...", flush=True)
  try:
    report = aot.fit_report(_CONFIG.value, tpu_slice, estimate=_ESTIMATE.value, devices=devices)
  except ValueError as err:
    sys.exit(f"sdlm-aot: the config is not valid for {tpu_slice.name}: {err}")
  except jax.errors.JaxRuntimeError as err:  # the TPU compiler refuses a program past the chip's HBM
    reason = next((line for line in str(err).splitlines() if "memory" in line), None)
    if "RESOURCE_EXHAUSTED" not in str(err) or reason is None:
      raise
    sys.exit(f"sdlm-aot: does not fit on {tpu_slice.name}: {reason.strip()}\n{_ADVICE}")
  print(aot.format_report(report))
  if not report["fits"]:
    mem = report["hbm"]
    sys.exit(f"sdlm-aot: does not fit: {mem['total'] / 2**30:.2f} GiB per chip needed, "
             f"{report['hbm_capacity'] / 2**30:.2f} GiB available on {tpu_slice.chip}\n{_ADVICE}")


def run():
  common.run_main(main, PROG)


if __name__ == "__main__":
  run()
