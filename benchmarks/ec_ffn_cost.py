"""The expert-choice MoE layer with the XLA expert path vs the ec_ffn kernel (XLA cost model,
compiled on CPU for one TPU chip; the kernel counts through its declared cost).

Seed size: 8 x 2048 tokens per chip (batch-level routing), d_model 2048, 64 experts x 640,
top_k 8 (C = 2048), no shared expert, bf16 params. Needs libtpu (`pip install -e ".[tpu]"`).

  python benchmarks/ec_ffn_cost.py                      # one v5p chip
  python benchmarks/ec_ffn_cost.py --topology v6e:2x2   # one v6e chip
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels import aot  # noqa: E402
from sdlm_jax.aot import ESTIMATE_OPTIONS  # noqa: E402
from sdlm_jax.config_files import repo_module  # noqa: E402
from sdlm_jax.model.moe import MoE  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5p:2x2x1")
  topology = parser.parse_args().topology
  print(f"{'backend':8} {'pass':8} {'est ms':>8} {'kernels':>8} {'HBM GiB':>8}  kernel VMEM MiB")
  for backend in ("xla", "pallas"):
    cfg = repo_module("demo").get_config("ec").model
    cfg.d_model, cfg.dtype = 2048, "bfloat16"
    cfg.moe.num_experts, cfg.moe.expert_mlp_dim, cfg.moe.top_k, cfg.moe.num_shared_experts = 64, 640, 8, 0
    cfg.moe.ec_group, cfg.moe.backend = "batch", backend
    with nnx.use_eager_sharding(False):
      layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))  # pylint: disable=cell-var-from-loop
    graphdef, params = nnx.split(layer, nnx.Param)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), params)
    fwd = lambda p, x, g=graphdef: nnx.merge(g, p)(x, jnp.ones(x.shape[:2], bool))[0]
    loss = lambda p, x, f=fwd: jnp.sum(jnp.square(f(p, x).astype(jnp.float32)))  # needs y: the forward runs
    for name, fn in (("fwd", fwd), ("fwd+bwd", jax.grad(loss, argnums=(0, 1)))):
      compiled = aot.compile_on(topology, fn, params, ((8, 2048, 2048), jnp.bfloat16),
                                compiler_options=ESTIMATE_OPTIONS)
      kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
      vmem = {k: round(v[0] / 2**20, 1) for k, v in aot.kernel_vmem(compiled).items()}
      print(f"{backend:8} {name:8} {1e3 * aot.estimated_seconds(compiled):8.3f} {kernels:8d} "
            f"{aot.hbm_bytes(compiled) / 2**30:8.2f}  {vmem or ''}")


if __name__ == "__main__":
  main()
