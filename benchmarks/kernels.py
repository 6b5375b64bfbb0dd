"""MoE kernels: what the TPU compiler makes of them (AOT on a CPU host), and GPU timings when a
GPU is present. Prints one table in three sections.

  JAX_PLATFORMS=cpu python benchmarks/kernels.py [--topologies v5e:2x2,v5p:2x2x1,v6e:2x2]

1. Pallas TPU grouped matmuls, compiled by Mosaic for each chip at a token-choice MoE layer's
   size (16384 routed rows, d_model 2048, expert FFN 1024, 64 experts, bf16): the tiling the
   analytic model picked, the VMEM the compiled kernel uses (libtpu's report), the program's
   HBM, and the model's time next to the dense roofline 2mkn/peak. Model times are estimates,
   not measurements; XLA's cost model cannot time a Pallas call (it echoes our CostEstimate).
2. The expert-choice MoE layer (all XLA: top-k, gather, batched SwiGLU einsums, scatter-add),
   forward + backward, XLA's cost-model time per chip: the whole layer (with float32 and with
   bf16 params), the expert matmuls alone (what any dispatch scheme must pay), and dispatch /
   combine alone next to their HBM lower bound (bytes they must move / bandwidth). Reference layer: 8192 tokens (4 x 2048),
   d 2048, expert FFN 1024, 64 experts, k=1; docs/figures.md's v5p figures: 1.79 ms whole layer,
   1.34 ms matmuls alone.
3. GPU: gmm (Pallas Triton vs lax.ragged_dot), measured, only when a GPU is present.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import aot, target  # noqa: E402
from pallas_kernels.gmm import tiling  # noqa: E402
from sdlm_jax.aot import ESTIMATE_OPTIONS  # noqa: E402

MIB = 2**20
ROWS, D, F, EXPERTS = 16384, 2048, 1024, 64


def _row(*cells, widths, left=1):
  """One table row: the first `left` cells left-aligned, the rest right-aligned."""
  return "  ".join(f"{c:<{w}}" if i < left else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))


def tpu_kernel_section(topologies):
  widths = (5, 19, 14, 8, 7, 8, 11, 10)
  print(f"1. Pallas TPU kernels, Mosaic AOT: m={ROWS} d={D} f={F} groups={EXPERTS} bf16")
  print(_row("chip", "kernel", "tile tm,tk,tn", "VMEM MiB", "HBM MiB", "model us", "roofline us",
             "model TF/s", widths=widths, left=3))
  bf16 = jnp.bfloat16
  for topo in topologies:
    chip_name = aot.chip_of(topo)
    chip = target.CHIPS[chip_name]
    cases = [  # name, kind, (m, k, n), fn, shapes
        ("gmm fwd (gate/up)", "gmm", (ROWS, D, F), lambda a, b, s: pk.gmm(a, b, s, backend="pallas"),
         [((ROWS, D), bf16), ((EXPERTS, D, F), bf16), ((EXPERTS,), jnp.int32)]),
        ("gmm fwd (down)", "gmm", (ROWS, F, D), lambda a, b, s: pk.gmm(a, b, s, backend="pallas"),
         [((ROWS, F), bf16), ((EXPERTS, F, D), bf16), ((EXPERTS,), jnp.int32)]),
        ("tgmm (d_w gate/up)", "tgmm", (ROWS, D, F), lambda a, g, s: pk.tgmm(a, g, s, backend="pallas"),
         [((ROWS, D), bf16), ((ROWS, F), bf16), ((EXPERTS,), jnp.int32)]),
    ]
    for name, kind, (m, k, n), fn, shapes in cases:
      compiled = aot.compile_on(topo, fn, *shapes)
      (used, _, _), = aot.kernel_vmem(compiled).values()
      with target.compile_for("tpu", chip_name):
        plan = tiling.choose(kind, m, k, n, EXPERTS, 2, 2)
      flops = 2 * m * k * n
      print(_row(chip_name, name, f"{plan.tm},{plan.tk},{plan.tn}", f"{used / MIB:.1f}",
                 f"{aot.hbm_bytes(compiled) / MIB:.0f}", f"{plan.seconds * 1e6:.0f}",
                 f"{flops / chip.bf16_flops * 1e6:.0f}", f"{flops / plan.seconds / 1e12:.0f}", widths=widths, left=3))


def _ec_layer(d, f, experts, top_k, param_dtype="float32"):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  demo = repo_module("demo")
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  cfg = demo.get_config("ec").model
  cfg.d_model, cfg.dtype, cfg.param_dtype = d, "bfloat16", param_dtype
  cfg.moe.num_experts, cfg.moe.expert_mlp_dim, cfg.moe.top_k = experts, f, top_k
  cfg.moe.num_shared_experts, cfg.moe.ec_group = 0, "sequence"
  with nnx.use_eager_sharding(False):
    layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(p, x):
    y, losses, _ = nnx.merge(graphdef, p)(x, jnp.ones(x.shape[:2], bool))
    return jnp.sum(y.astype(jnp.float32)) + losses["z_loss"]
  return jax.grad(loss, argnums=(0, 1)), params


def ec_layer_section(topologies, batch=4, length=2048, top_k=1):
  capacity = length * top_k // EXPERTS
  tokens, slots = batch * length, batch * EXPERTS * capacity
  print(f"\n2. Expert-choice MoE layer (XLA), fwd+bwd, XLA cost model: {batch}x{length} tokens, d {D}, "
        f"expert FFN {F}, {EXPERTS} experts, k={top_k}, C={capacity}, bf16 (ms)")
  widths = (10, 12, 12, 14, 9, 15, 8, 14, 14)
  print(_row("chip", "whole layer", "bf16 params", "matmuls alone", "dispatch", "dispatch bound", "combine", "combine bound",
             "parts / matmuls", widths=widths))
  layer_grad, params = _ec_layer(D, F, EXPERTS, top_k)
  layer_grad_bf16, params_bf16 = _ec_layer(D, F, EXPERTS, top_k, "bfloat16")
  bf16 = jnp.bfloat16

  def matmuls(w_gate, w_up, w_down, xe):
    def f(wg, wu, wd, x):
      h = jax.nn.silu(jnp.einsum("gecd,edf->gecf", x, wg)) * jnp.einsum("gecd,edf->gecf", x, wu)
      return jnp.sum(jnp.einsum("gecf,efd->gecd", h, wd).astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1, 2, 3))(w_gate, w_up, w_down, xe)

  def dispatch(x, idx, cot):  # forward value and input gradient (returning both keeps both alive)
    out, vjp = jax.vjp(lambda x_: pk.ec_dispatch(x_, idx), x)
    return out, vjp(cot)

  def combine(y, idx, w, cot):
    out, vjp = jax.vjp(lambda a, b: pk.ec_combine(a, idx, b, length), y, w)
    return out, vjp(cot)

  row_bytes = D * 2
  # Dispatch: fwd reads the picked rows and writes them; bwd reads their cotangents, writes dx.
  dispatch_bound_bytes = (2 * slots + slots + tokens) * row_bytes
  # Combine: fwd reads expert rows, writes tokens; bwd reads token cotangents (gathered per
  # slot) and expert rows (for the weight gradient), writes d_y.
  combine_bound_bytes = (slots + tokens + 3 * slots) * row_bytes
  for topo in topologies:
    chip = target.CHIPS[aot.chip_of(topo)]
    ms = lambda c: aot.estimated_seconds(c) * 1e3
    compile_on = functools.partial(aot.compile_on, compiler_options=ESTIMATE_OPTIONS)
    whole = ms(compile_on(topo, layer_grad, params, ((batch, length, D), bf16)))
    whole_bf16 = ms(compile_on(topo, layer_grad_bf16, params_bf16, ((batch, length, D), bf16)))
    alone = ms(compile_on(topo, matmuls, ((EXPERTS, D, F), bf16), ((EXPERTS, D, F), bf16),
                          ((EXPERTS, F, D), bf16), ((batch, EXPERTS, capacity, D), bf16)))
    disp = ms(compile_on(topo, dispatch, ((batch, length, D), bf16), ((batch, EXPERTS, capacity), jnp.int32),
                         ((batch, EXPERTS, capacity, D), bf16)))
    comb = ms(compile_on(topo, combine, ((batch, EXPERTS, capacity, D), bf16),
                         ((batch, EXPERTS, capacity), jnp.int32), ((batch, EXPERTS, capacity), bf16),
                         ((batch, length, D), bf16)))
    bound = lambda b: f"{b / chip.hbm_bytes_per_s * 1e3:.3f}"
    fmt = lambda t: "n/a" if np.isnan(t) else f"{t:.3f}"
    print(_row(aot.chip_of(topo), fmt(whole), fmt(whole_bf16), fmt(alone), fmt(disp), bound(dispatch_bound_bytes),
               fmt(comb), bound(combine_bound_bytes), fmt((alone + disp + comb) / alone), widths=widths))
  print("Compiled with sdlm_jax.aot.ESTIMATE_OPTIONS (no SparseCore scatter offload or sliced VMEM prefetches,\n"
        "which the cost model prices at -1 s; n/a: it still returned a negative time); parts / matmuls =\n"
        "(matmuls + dispatch + combine) / matmuls. 'whole layer' has float32 params cast to bf16 in the step,\n"
        "as training does; 'bf16 params' is the same layer without the casts and with bf16 gradients.\n"
        "Bounds: the bytes each op must move once, at full HBM bandwidth.")


def _time(fn, *args, reps=20):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def gpu_section():
  print("\n3. GPU gmm, measured (ms): Pallas Triton kernel vs lax.ragged_dot, bf16")
  gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
  if not gpus:
    print("no GPU")
    return
  widths = (22, 10, 12, 10, 12)
  print(_row("m,k,n,groups", "triton fwd", "ragged fwd", "triton f+b", "ragged f+b", widths=widths))
  rng = np.random.default_rng(0)
  for m, k, n, g in ((16384, 2048, 1024, 64), (16384, 1024, 2048, 64), (8192, 4096, 1536, 8)):
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    sizes = jnp.asarray(np.diff(np.concatenate([[0], np.sort(rng.integers(0, m, g - 1)), [m]])), jnp.int32)
    cells = []
    for backend in ("pallas", "xla"):
      fwd = jax.jit(lambda a, b, bk=backend: pk.gmm(a, b, sizes, backend=bk))
      both = jax.jit(jax.grad(lambda a, b, bk=backend: jnp.sum(pk.gmm(a, b, sizes, backend=bk).astype(jnp.float32)),
                              argnums=(0, 1)))
      cells.append((_time(fwd, lhs, rhs) * 1e3, _time(both, lhs, rhs) * 1e3))
    print(_row(f"{m},{k},{n},{g}", f"{cells[0][0]:.3f}", f"{cells[1][0]:.3f}", f"{cells[0][1]:.3f}",
               f"{cells[1][1]:.3f}", widths=widths))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1,v6e:2x2")
  args = parser.parse_args()
  topologies = args.topologies.split(",")
  tpu_kernel_section(topologies)
  ec_layer_section(topologies)
  gpu_section()


if __name__ == "__main__":
  main()
