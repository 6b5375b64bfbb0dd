"""Train-step throughput of the demo config: dense vs expert-choice MoE vs token-choice MoE.

The three variants have the same active FLOPs per token (see configs/demo.py). Steps of the
variants are interleaved round by round so machine noise hits all of them alike; the table
reports tokens/s relative to dense, and the compiled step's FLOPs (XLA cost analysis) over
the model's analytic FLOPs (sdlm_jax.scaling.flops). For EC that ratio must stay <= 1.1: the
dispatch adds no hidden matmul work. On CPU, `lax.ragged_dot` (the TC path) is costed and run
as a dense matmul over all experts, so TC's ratio there is about num_experts/top_k.

  python benchmarks/train_throughput.py [--steps 10] [--rounds 3] [--batch 16]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import demo  # noqa: E402
from pallas_kernels.aot import cost_analysis  # noqa: E402
from sdlm_jax.parallel.mesh import make_mesh  # noqa: E402
from sdlm_jax.scaling.flops import flops_per_token  # noqa: E402
from sdlm_jax.train.loop import global_batch  # noqa: E402
from sdlm_jax.train.state import init_model  # noqa: E402
from sdlm_jax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from sdlm_jax.train.step import make_train_step  # noqa: E402

MASK_ID = 4


def build(variant, batch_size):
  cfg = demo.get_config(variant)
  cfg.train.batch_size = batch_size
  cfg.model.scan_layers = False  # XLA's cost analysis counts a scan body once; unrolled is the same math
  mesh = make_mesh(cfg.mesh)
  model = init_model(cfg, mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(cfg.train.optimizer, cfg.train.num_steps)
  opt_state = tx.init(params)
  step_fn = make_train_step(graphdef, rest, tx, learning_rate_schedule(cfg.train.optimizer, cfg.train.num_steps),
                            cfg, MASK_ID)
  rng = np.random.default_rng(0)
  shape = (batch_size, cfg.data.seq_len)
  batch = global_batch({
      "tokens": rng.integers(5, cfg.model.vocab_size, shape, dtype=np.int32),
      "segment_ids": np.ones(shape, np.int32),
      "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
  }, mesh)
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(params, opt_state, batch, jnp.int32(0)).compile()
  cost = cost_analysis(compiled)
  analytic = flops_per_token(cfg.model, cfg.data.seq_len, training=True) * batch_size * cfg.data.seq_len
  return dict(cfg=cfg, mesh=mesh, step=step_fn, params=params, opt_state=opt_state, batch=batch,
              compiled_flops=float(cost["flops"]), analytic_flops=analytic, times=[])


def run_steps(v, steps, start):
  with jax.set_mesh(v["mesh"]):
    t0 = time.perf_counter()
    for i in range(steps):
      v["params"], v["opt_state"], m = v["step"](v["params"], v["opt_state"], v["batch"], jnp.int32(start + i))
    jax.block_until_ready(m["loss"])
    return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--batch", type=int, default=16)
  args = parser.parse_args()

  variants = {"dense": "dense", "ec-moe": "ec", "tc-moe": "tc"}
  built = {name: build(arg, args.batch) for name, arg in variants.items()}
  for v in built.values():
    run_steps(v, 2, 0)  # warm up (compile, caches)
  for r in range(args.rounds):
    for v in built.values():
      v["times"].append(run_steps(v, args.steps, 2 + r * args.steps))

  tokens = args.batch * built["dense"]["cfg"].data.seq_len * args.steps
  dense_tps = tokens / np.median(built["dense"]["times"])
  print(f"devices: {jax.devices()}  batch {args.batch} x seq {built['dense']['cfg'].data.seq_len}, "
        f"{args.rounds} rounds x {args.steps} steps, median round")
  header = f"{'variant':<8} {'tokens/s':>10} {'vs dense':>9} {'compiled GFLOP':>15} {'analytic GFLOP':>15} {'compiled/analytic':>18}"
  print(header)
  print("-" * len(header))
  for name, v in built.items():
    tps = tokens / np.median(v["times"])
    print(f"{name:<8} {tps:>10.0f} {tps / dense_tps:>9.2f} {v['compiled_flops'] / 1e9:>15.2f} "
          f"{v['analytic_flops'] / 1e9:>15.2f} {v['compiled_flops'] / v['analytic_flops']:>18.3f}")


if __name__ == "__main__":
  main()
