"""Train-step throughput of the demo config: dense vs expert-choice MoE vs token-choice MoE.

The three variants have the same active FLOPs per token (see configs/demo.py); a fourth,
`ec-scan`, is the EC model with its layers scanned (as TPU configs run them) instead of
unrolled (as the demo runs on CPU). Steps of the
variants are interleaved round by round so machine noise hits all of them alike; the table
reports tokens/s relative to dense, and the compiled step's FLOPs (XLA cost analysis) over
the model's analytic FLOPs (sdlm_jax.scaling.flops). For EC that ratio must stay <= 1.1: the
dispatch adds no hidden matmul work. On CPU, `lax.ragged_dot` (the TC path) is costed and run
as a dense matmul over all experts, so TC's ratio there is about num_experts/top_k.

Regression check. Absolute tokens/s says as much about the machine as about the code (the
shared 2-core machines vary by 2x from day to day), so each variant is also measured against
a yardstick timed in the same rounds: a plain-JAX MLP forward+backward that uses none of this
library. `efficiency` is the variant's analytic model FLOP/s over the yardstick's FLOP/s.
`--check` compares it with the stored reference (train_throughput_reference.json beside this
file) and exits 1 when a variant falls more than --tolerance below it; `--record` stores the
measured values as the new reference.

  python benchmarks/train_throughput.py [--steps 10] [--rounds 3] [--batch 16] [--check | --record]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.aot import cost_analysis  # noqa: E402
from sdlm_jax.config_files import repo_module  # noqa: E402
from sdlm_jax.parallel.mesh import make_mesh  # noqa: E402
from sdlm_jax.scaling.flops import flops_per_token  # noqa: E402
from sdlm_jax.train import program as program_lib  # noqa: E402

demo = repo_module("demo")
REFERENCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput_reference.json")
YARDSTICK = dict(tokens=2048, d=256, f=1024, layers=4)  # ~ the demo's shape, plain JAX


def build_yardstick():
  """A plain-JAX MLP stack's forward+backward on [tokens, d], independent of sdlm_jax."""
  t, d, f, n = (YARDSTICK[k] for k in ("tokens", "d", "f", "layers"))
  keys = jax.random.split(jax.random.key(0), 2 * n + 1)
  weights = [(jax.random.normal(keys[2 * i], (d, f)) * 0.02, jax.random.normal(keys[2 * i + 1], (f, d)) * 0.02)
             for i in range(n)]
  x_TxD = jax.random.normal(keys[-1], (t, d))

  def loss(weights):
    h_TxD = x_TxD
    for w_in, w_out in weights:
      h_TxD = h_TxD + jax.nn.gelu(h_TxD @ w_in) @ w_out
    return jnp.mean(h_TxD ** 2)

  grad = jax.jit(jax.grad(loss))
  flops = 3 * n * 2 * 2 * t * d * f  # two matmuls per layer, forward + 2x backward
  return dict(run=lambda: jax.block_until_ready(grad(weights)), flops=flops, times=[])


def time_yardstick(y, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    y["run"]()
  return time.perf_counter() - t0


def build(variant, batch_size, scan_layers=False):
  cfg = demo.get_config(variant)
  cfg.train.batch_size = batch_size
  cfg.model.scan_layers = scan_layers
  program = program_lib.build(cfg, make_mesh(cfg.mesh))
  batch = program.synthetic_batch()
  # XLA's cost analysis counts a scan body once: a scanned program's FLOPs are not comparable.
  cost = {"flops": float("nan")} if scan_layers else cost_analysis(program.lower().compile())
  analytic = flops_per_token(cfg.model, cfg.data.seq_len, training=True) * batch_size * cfg.data.seq_len
  return dict(cfg=cfg, program=program, batch=batch, compiled_flops=float(cost["flops"]), analytic_flops=analytic,
              times=[])


def run_steps(v, steps, start):
  program = v["program"]
  with program.context():
    t0 = time.perf_counter()
    for i in range(steps):
      program.params, program.opt_state, m = program.step(program.params, program.opt_state, v["batch"],
                                                          jnp.int32(start + i))
    jax.block_until_ready(m["loss"])
    return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--check", action="store_true", help="exit 1 if a variant's efficiency regressed")
  parser.add_argument("--record", action="store_true", help="store the measured efficiencies as the reference")
  parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative drop for --check")
  args = parser.parse_args()

  # ec-scan: the demo's EC model with its layers under lax.scan, as the TPU configs run them.
  variants = {"dense": ("dense", False), "ec-moe": ("ec", False), "tc-moe": ("tc", False), "ec-scan": ("ec", True)}
  built = {name: build(arg, args.batch, scan) for name, (arg, scan) in variants.items()}
  yardstick = build_yardstick()
  for v in built.values():
    run_steps(v, 2, 0)  # warm up (compile, caches)
  time_yardstick(yardstick, 2)
  for r in range(args.rounds):
    yardstick["times"].append(time_yardstick(yardstick, args.steps))
    for v in built.values():
      v["times"].append(run_steps(v, args.steps, 2 + r * args.steps))

  seq_len = built["dense"]["cfg"].data.seq_len
  tokens = args.batch * seq_len * args.steps
  dense_tps = tokens / np.median(built["dense"]["times"])
  yardstick_flops_per_s = yardstick["flops"] * args.steps / np.median(yardstick["times"])
  print(f"devices: {jax.devices()}  batch {args.batch} x seq {seq_len}, {args.rounds} rounds x {args.steps} steps, "
        f"median round; yardstick {yardstick_flops_per_s / 1e9:.1f} GFLOP/s")
  header = (f"{'variant':<8} {'tokens/s':>10} {'vs dense':>9} {'compiled GFLOP':>15} {'analytic GFLOP':>15} "
            f"{'compiled/analytic':>18} {'efficiency':>11}")
  print(header)
  print("-" * len(header))
  efficiency = {}
  for name, v in built.items():
    tps = tokens / np.median(v["times"])
    efficiency[name] = v["analytic_flops"] * args.steps / np.median(v["times"]) / yardstick_flops_per_s
    print(f"{name:<8} {tps:>10.0f} {tps / dense_tps:>9.2f} {v['compiled_flops'] / 1e9:>15.2f} "
          f"{v['analytic_flops'] / 1e9:>15.2f} {v['compiled_flops'] / v['analytic_flops']:>18.3f} "
          f"{efficiency[name]:>11.3f}")
  if args.record:
    with open(REFERENCE_FILE, "w") as f:
      json.dump({"batch": args.batch, "efficiency": efficiency}, f, indent=2)
    print(f"reference written to {REFERENCE_FILE}")
  if args.check:
    sys.exit(check(efficiency, args.batch, args.tolerance))


def check(efficiency: dict, batch: int, tolerance: float) -> int:
  """0 if every variant is within `tolerance` of the stored reference efficiency, else 1."""
  with open(REFERENCE_FILE) as f:
    reference = json.load(f)
  if reference["batch"] != batch:
    print(f"the reference was recorded at --batch {reference['batch']}; rerun with it")
    return 1
  failed = [name for name, value in efficiency.items() if value < (1 - tolerance) * reference["efficiency"][name]]
  for name, value in efficiency.items():
    print(f"{name:<8} efficiency {value:.3f} vs reference {reference['efficiency'][name]:.3f} "
          f"({value / reference['efficiency'][name] - 1:+.1%})")
  print("REGRESSION: " + ", ".join(failed) if failed else "no regression")
  return 1 if failed else 0


if __name__ == "__main__":
  main()
