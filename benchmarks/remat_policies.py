"""Attention kernel x remat policy on a TPU slice, compiled on this CPU machine (sdlm-aot's
figures for each; sdlm_jax/aot.py), to choose a config's default.

For each policy: HBM per chip (of the chip's capacity), compiled over analytic FLOPs, XLA's
estimated step time, the MFU and tokens/s/chip it implies. The policy to choose is the
fastest whose HBM stays under --margin of the chip's (default a quarter: room for twice the
batch, for v6e's 32 GiB, for the runtime and for XLA's estimates being off); it is marked *. Needs libtpu; each row compiles
the full scanned step plus two small unrolled ones (a few CPU minutes per row).

  python benchmarks/remat_policies.py                                  # dense_1b7, v5p-128, splash
  python benchmarks/remat_policies.py --config ec_8b1b7a --policies minimal,full
  python benchmarks/remat_policies.py --attention xla --policies full,none   # the previous default
"""

import argparse
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from sdlm_jax import aot  # noqa: E402
from sdlm_jax.config_files import repo_module  # noqa: E402

POLICIES = ("full", "minimal", "minimal_with_context", "minimal_with_context_and_rope", "save_dot_except_mlp", "none")


def rows_for(config: str, slice_name: str, attention: str, policies, batch_size: int | None):
  tpu_slice = aot.parse_slice(slice_name)
  devices = aot.slice_devices(tpu_slice)
  out = []
  for policy in policies:
    cfg = repo_module(f"openmoe2/{config}").get_config()
    cfg.model.attention = attention
    cfg.model.remat = policy
    if batch_size:
      cfg.train.batch_size = batch_size
    start = time.time()
    r = aot.fit_report(cfg, tpu_slice, devices=devices)
    print(f"[{time.time() - start:.0f} s] {config} on {slice_name}, attention={attention}, remat={policy}:\n"
          f"{aot.format_report(r)}\n", flush=True)
    out.append((policy, r))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="dense_1b7", help="a name in configs/openmoe2/")
  parser.add_argument("--slice", default="v5p-128", help="accelerator type")
  parser.add_argument("--attention", default="auto", help="model.attention (auto is splash on TPU)")
  parser.add_argument("--policies", default=",".join(POLICIES), help="model.remat values, comma-separated")
  parser.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
  parser.add_argument("--margin", type=float, default=0.25, help="HBM fraction a chosen policy may use")
  args = parser.parse_args()

  rows = rows_for(args.config, args.slice, args.attention, args.policies.split(","), args.batch_size)
  fitting = [(r["step_seconds"], policy) for policy, r in rows
             if r["hbm"]["total"] <= args.margin * r["hbm_capacity"] and math.isfinite(r["step_seconds"])]
  best = min(fitting)[1] if fitting else None
  header = ("config", "slice", "attention", "remat", "HBM/chip", "FLOPs ratio", "est. step", "MFU", "tokens/s/chip")
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for policy, r in rows:
    seconds = r["step_seconds"]
    timing = ((f"{seconds:.3f} s", f"{100 * r['mfu']:.1f}%", f"{r['tokens_per_sec_per_chip']:,.0f}")
              if math.isfinite(seconds) else ("n/a",) * 3)
    print("| " + " | ".join((
        args.config, args.slice, args.attention, policy + (" *" if policy == best else ""),
        f"{r['hbm']['total'] / 2**30:.1f} / {r['hbm_capacity'] / 2**30:.0f} GiB{'' if r['fits'] else ' (no fit)'}",
        f"{r['compiled_flops_per_chip'] / r['analytic_flops_per_chip']:.2f}", *timing)) + " |")
  print(f"* fastest within {100 * args.margin:.0f}% of the chip's HBM" if best else
        f"no policy fits within {100 * args.margin:.0f}% of the chip's HBM")


if __name__ == "__main__":
  main()
