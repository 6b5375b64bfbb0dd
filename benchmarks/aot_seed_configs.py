"""The seed models on TPU slices, compiled on this CPU machine (sdlm-aot for each; sdlm_jax/aot.py).

For each config and slice: params, HBM per chip (of the chip's capacity), compiled over
analytic FLOPs, XLA's estimated step time, the MFU and tokens/s/chip it implies, and the
step time relative to the 1.7B dense model on the same slice (the EC MoE is FLOPs-matched to
it). Needs libtpu (`pip install -e ".[tpu]"`); each row compiles the full scanned step plus
2-3 small unrolled ones, a few CPU minutes per row.

  python benchmarks/aot_seed_configs.py                       # 3 configs x v5p-128, v6e-64
  python benchmarks/aot_seed_configs.py --slices v5p-64 --configs dense_1b7,ec_8b1b7a \
      --override model.remat=save_dots
  python benchmarks/aot_seed_configs.py --arms --slices v5p-128 [--fit_only]   # every ablation arm
      # (variant) of configs/openmoe2 and configs/quokka: does each fit its slice, and at what est. step

A config is NAME[:ARG] of a file under configs/ (`openmoe2/` may be left out): `ec_8b1b7a:tc`,
`quokka/gpt2_1b:uniform`.
"""

import argparse
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from sdlm_jax import aot  # noqa: E402
from sdlm_jax.config_files import repo_module  # noqa: E402

ARM_FILES = ("openmoe2/dense_1b7", "openmoe2/dense_8b", "openmoe2/ec_8b1b7a", "openmoe2/multi_epoch",
             "quokka/gpt2_1b")

CONFIGS = ("dense_1b7", "dense_8b", "ec_8b1b7a")
BASELINE = "dense_1b7"


def _override(cfg, assignment: str):
  """'a.b.c=value' with the value parsed as the field's current type."""
  key, value = assignment.split("=", 1)
  *path, last = key.split(".")
  node = cfg
  for name in path:
    node = node[name]
  kind = type(node[last])
  node[last] = (value.lower() in ("1", "true")) if kind is bool else kind(value)


def load(spec: str):
  name, _, arg = spec.partition(":")
  module = repo_module(name if "/" in name else f"openmoe2/{name}")
  cfg = module.get_config(arg)
  if cfg.data.source == "prepared":  # the unique-token arms: no corpus is read to compile
    cfg.data.paths = "unused"
  return cfg


def all_arms() -> list[str]:
  """Every seed config file and each of its named variants (the ablation arms)."""
  return [f"{name}:{variant}" if variant else name
          for name in ARM_FILES for variant in ("", *getattr(repo_module(name), "VARIANTS", ()))]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default=",".join(CONFIGS), help="names in configs/openmoe2/")
  parser.add_argument("--slices", default="v5p-128,v6e-64", help="accelerator types, comma-separated")
  parser.add_argument("--override", action="append", default=[], help="config field=value, for every config")
  parser.add_argument("--arms", action="store_true", help="every ablation arm instead of --configs")
  parser.add_argument("--fit_only", action="store_true",
                      help="compile the full step for HBM only, without the unrolled cost-model compiles (~3x faster)")
  args = parser.parse_args()
  specs = all_arms() if args.arms else args.configs.split(",")

  rows = []
  header = ("config", "slice", "params (active)", "batch", "HBM/chip", "FLOPs ratio", "est. step", "MFU",
            "tokens/s/chip", f"vs {BASELINE}")
  for slice_name in args.slices.split(","):
    tpu_slice = aot.parse_slice(slice_name)
    devices = aot.slice_devices(tpu_slice)
    baseline_seconds = float("nan")
    for name in specs:
      cfg = load(name)
      for assignment in args.override:
        _override(cfg, assignment)
      start = time.time()
      r = aot.fit_report(cfg, tpu_slice, estimate=not args.fit_only, devices=devices)
      seconds = r.get("step_seconds", float("nan"))
      print(f"[{time.time() - start:.0f} s] {name} on {slice_name}:\n{aot.format_report(r)}\n", flush=True)
      if name in (BASELINE, f"openmoe2/{BASELINE}"):
        baseline_seconds = seconds
      mem = r["hbm"]["total"] / 2**30
      rows.append((
          name, slice_name, f"{r['params_total'] / 1e9:.2f}B ({r['params_active'] / 1e9:.2f}B)",
          f"{cfg.train.batch_size}x{cfg.data.seq_len}",
          f"{mem:.1f} / {r['hbm_capacity'] / 2**30:.0f} GiB{'' if r['fits'] else ' (no fit)'}",
          f"{r['compiled_flops_per_chip'] / r['analytic_flops_per_chip']:.2f}" if "compiled_flops_per_chip" in r else "-",
          *((f"{seconds:.3f} s", f"{100 * r['mfu']:.1f}%", f"{r['tokens_per_sec_per_chip']:,.0f}")
            if math.isfinite(seconds) else ("n/a",) * 3),
          f"{seconds / baseline_seconds:.2f}x" if math.isfinite(seconds / baseline_seconds) else "-"))
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
