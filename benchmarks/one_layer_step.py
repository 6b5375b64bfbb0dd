"""One layer's train step on a TPU slice, compiled on this CPU machine, under config variants.

sdlm-aot extrapolates a step's time from unrolled compiles of one and two layers (sdlm_jax/aot.py);
this compiles the one-layer program (one layer of the config's last kind, plus the embedding,
head and optimizer, which every variant shares) for each variant and prints XLA's estimated
time, FLOPs, HBM and collectives, so that variants of one layer compare in a minute each
instead of the full step's several minutes. Needs libtpu.

  python benchmarks/one_layer_step.py                      # ec_8b1b7a on v5p-128: the XLA path vs the EC kernel
  python benchmarks/one_layer_step.py --variants "mesh.expert=1;mesh.expert=2;mesh.expert=8"
  python benchmarks/one_layer_step.py --variants ";model.remat=none;model.moe.backend=pallas,model.remat=none"

A variant is a comma-separated list of field=value overrides (empty: the config's defaults).
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from aot_seed_configs import _override, load  # noqa: E402
from sdlm_jax import aot  # noqa: E402


def one_layer(cfg):
  """cfg unrolled to one layer of its last kind (MoE if it has experts)."""
  moe = bool(cfg.model.moe.num_experts)
  return aot._with_depth(cfg, int(not moe), int(moe))  # pylint: disable=protected-access


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="ec_8b1b7a", help="NAME[:ARG] of a file under configs/")
  parser.add_argument("--slice", default="v5p-128", help="accelerator type or topology")
  parser.add_argument("--variants", default=";model.moe.backend=pallas",
                      help="';'-separated variants, each ','-separated field=value overrides")
  args = parser.parse_args()

  tpu_slice = aot.parse_slice(args.slice)
  devices = aot.slice_devices(tpu_slice)
  print(f"{args.config}, one layer, {tpu_slice.name}; XLA cost model (aot.ESTIMATE_OPTIONS)")
  print(f"{'variant':48s} {'est. ms':>8s} {'TFLOPs':>7s} {'HBM GiB':>8s}  collectives (count, GiB)")
  for variant in args.variants.split(";"):
    cfg = load(args.config)
    for assignment in filter(None, variant.split(",")):
      _override(cfg, assignment)
    start = time.time()
    compiled = aot.compile_train_step(one_layer(cfg), devices, tpu_slice.chip, aot.ESTIMATE_OPTIONS)
    cost = aot.cost(compiled)
    kinds = ", ".join(f"{k} {n} ({b / 2**30:.2f})" for k, (n, b) in sorted(aot.collectives(compiled).items()))
    print(f"{variant or '(defaults)':48s} {1e3 * cost['optimal_seconds']:8.2f} {float(cost['flops']) / 1e12:7.3f} "
          f"{aot.hbm(compiled)['total'] / 2**30:8.2f}  {kinds}   [{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
  main()
