"""Where a transformer block's time goes on a TPU chip (XLA cost model, compiled on CPU).

One v5p chip's share of the seed configs (4 x 2048 tokens, d_model 2048), forward + backward
of each part alone: the dense 1.7B model's SwiGLU FFN (6144), the ec_8b1b7a MoE layer (64
experts x 640, top_k 8, one shared expert) and its parts, the attention module (projections,
RoPE, splash) and the splash kernel alone, then the whole dense and EC blocks without remat and
under their configs' remat policy. "ideal ms" is the part's compiled FLOPs at the chip's peak
bf16 rate: est. / ideal is how far XLA's cost model puts the part from the matmul roofline.
Needs libtpu (`pip install -e ".[tpu]"`).

  python benchmarks/ec_layer_cost.py                      # one v5p chip
  python benchmarks/ec_layer_cost.py --topology v6e:2x2   # one v6e chip
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sdlm_jax.config_files import repo_module  # noqa: E402

dense_1b7, ec_8b1b7a = repo_module("openmoe2/dense_1b7"), repo_module("openmoe2/ec_8b1b7a")
from pallas_kernels import aot, reference, target  # noqa: E402
from sdlm_jax.aot import ESTIMATE_OPTIONS  # noqa: E402
from sdlm_jax.model import routing  # noqa: E402
from sdlm_jax.model.attention import Attention  # noqa: E402
from sdlm_jax.model.mlp import SwiGLU  # noqa: E402
from sdlm_jax.model.moe import MoE  # noqa: E402
from sdlm_jax.model.splash import splash_attention  # noqa: E402
from sdlm_jax.model.transformer import Block, run_block  # noqa: E402

TOPOLOGY = "v5p:2x2x1"  # the default; compiled for one chip of it
BATCH, LENGTH = 4, 2048
CFG = ec_8b1b7a.get_config().model
D, E, F, K = CFG.d_model, CFG.moe.num_experts, CFG.moe.expert_mlp_dim, CFG.moe.top_k
N = BATCH * LENGTH
C = N * K // E


def _spec(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _cost(topology, fn, *specs):
  cost = aot.cost_analysis(aot.compile_on(topology, fn, *specs, compiler_options=ESTIMATE_OPTIONS))
  return float(cost["optimal_seconds"]), float(cost["flops"]), float(cost.get("bytes accessed", 0.0))


def _module_grad(make, call):
  graphdef, state = nnx.split(make())
  state = jax.tree.map(lambda a: _spec(a.shape, a.dtype), state)
  loss = lambda s, x: jnp.sum(call(nnx.merge(graphdef, s), x).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1)), state, _spec((BATCH, LENGTH, D))


def _block_grad(cfg, is_moe: bool, remat: str = "none"):
  """A whole transformer block (attention + FFN or MoE) with segment ids, positions and mask,
  rematerialised as the model's layer stack does it under `remat`."""
  graphdef, state = nnx.split(Block(cfg, is_moe, rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda a: _spec(a.shape, a.dtype), state)
  ids = _spec((BATCH, LENGTH), jnp.int32)
  run = run_block(remat)

  def loss(s, x, segment_ids, positions):
    y = run(graphdef, s, x, segment_ids, positions, jnp.ones((BATCH, LENGTH), bool))[0]
    return jnp.sum(y.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1)), state, _spec((BATCH, LENGTH, D)), ids, ids


def _experts(w_gate, w_up, w_down, xe_GxExCxD, gates_GxExC):
  h = jax.nn.silu(jnp.einsum("gecd,edf->gecf", xe_GxExCxD, w_gate)) * jnp.einsum("gecd,edf->gecf", xe_GxExCxD, w_up)
  return jnp.einsum("gecf,efd->gecd", h * gates_GxExC[..., None].astype(h.dtype), w_down)


def _router(x_BxLxD, router_DxE):
  logits = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), router_DxE).reshape(1, N, E)
  return jnp.sum(routing.expert_choice(logits, jnp.ones((1, N), bool), K, "softmax")[1])


def _splash_grad(cfg):
  def loss(q, k, v, segment_ids):
    return jnp.sum(splash_attention(q, k, v, segment_ids, causal=False).astype(jnp.float32))
  q, kv = _spec((BATCH, LENGTH, cfg.num_heads, cfg.head_dim)), _spec((BATCH, LENGTH, cfg.num_kv_heads, cfg.head_dim))
  return jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, _spec((BATCH, LENGTH), jnp.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default=TOPOLOGY, help="TPU topology to compile for (one chip of it is used)")
  topology = parser.parse_args().topology
  peak = target.CHIPS[aot.chip_of(topology)].bf16_flops
  dense_cfg = dense_1b7.get_config().model
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
  idx, gates = _spec((1, E, C), jnp.int32), _spec((1, E, C))
  weights = [_spec((E, D, F)), _spec((E, D, F)), _spec((E, F, D))]
  parts = [
      ("dense SwiGLU FFN 6144 (1.7B dense)",
       *_module_grad(lambda: SwiGLU(D, CFG.mlp_dim, CFG, rngs=nnx.Rngs(0)), lambda m, x: m(x))),
      ("EC MoE layer (whole)",
       *_module_grad(lambda: MoE(CFG, rngs=nnx.Rngs(0)), lambda m, x: m(x, jnp.ones((BATCH, LENGTH), bool))[0])),
      ("  expert matmuls (gated)",
       jax.grad(lambda *a: jnp.sum(_experts(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)),
       *weights, _spec((1, E, C, D)), gates),
      ("  shared expert (SwiGLU 640)",
       *_module_grad(lambda: SwiGLU(D, F, CFG, rngs=nnx.Rngs(0)), lambda m, x: m(x))),
      ("  router (logits, top-C, gates)", jax.grad(_router, argnums=(0, 1)),
       _spec((BATCH, LENGTH, D)), _spec((D, E), jnp.float32)),
      ("  dispatch (gather)", jax.grad(lambda x, i: jnp.sum(reference.ec_dispatch(x, i).astype(jnp.float32) ** 2)),
       _spec((1, N, D)), idx),
      ("  combine (scatter-add)",
       jax.grad(lambda y, i: jnp.sum(reference.ec_combine(y, i, None, N).astype(jnp.float32) ** 2)),
       _spec((1, E, C, D)), idx),
      ("attention module (1.7B dense)",
       *_module_grad(lambda: Attention(dense_cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x, None, positions))),
      ("  splash attention kernel", *_splash_grad(dense_cfg)),
      ("dense block (attention + FFN)", *_block_grad(dense_cfg, False)),
      (f"  remat {dense_cfg.remat}", *_block_grad(dense_cfg, False, dense_cfg.remat)),
      ("EC block (attention + MoE)", *_block_grad(CFG, True)),
      (f"  remat {CFG.remat}", *_block_grad(CFG, True, CFG.remat)),
  ]
  print(f"one chip of {topology}, {N} tokens")
  print(f"{'part (forward + backward)':38s} {'est. ms':>8s} {'ideal ms':>8s} {'GFLOP':>8s} {'GB moved':>9s} "
        f"{'/ dense FFN':>11s}")
  dense = None
  for name, fn, *specs in parts:
    seconds, flops, moved = _cost(topology, fn, *specs)
    dense = dense or seconds
    print(f"{name:38s} {seconds * 1e3:8.3f} {flops / peak * 1e3:8.3f} {flops / 1e9:8.1f} {moved / 1e9:9.2f} "
          f"{seconds / dense:11.2f}", flush=True)


if __name__ == "__main__":
  main()
