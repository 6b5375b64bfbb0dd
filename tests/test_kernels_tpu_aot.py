"""The Pallas TPU kernels compile for real TPUs (Mosaic, through libtpu) on this CPU host.

A kernel Mosaic rejects fails here. Sizes are an MoE layer's: 16384 routed rows, d_model 2048,
expert FFN 1024, 64 experts, bf16, forward and backward (the gate/up projection k=2048 -> n=1024
and the down projection 1024 -> 2048), plus expert parallelism (8 of the 64 groups local) and
float32. Each kernel's VMEM as libtpu reports it must fit the chip's VMEM and the scoped limit
the kernel requests; the whole program's HBM must fit the chip.
"""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import aot, target
from pallas_kernels.gmm import tiling

pytestmark = pytest.mark.tpu_aot
pytest.importorskip("jax.experimental.topologies")

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
M, D, F, G = 16384, 2048, 1024, 64


def _fwd_bwd(group_offset=None):
  def fn(lhs, rhs, sizes, cot):
    out, vjp = jax.vjp(lambda a, b: pk.gmm(a, b, sizes, group_offset=group_offset, backend="pallas"), lhs, rhs)
    return out, vjp(cot)
  return fn


def _check(topology, compiled, kernels):
  chip = target.CHIPS[aot.chip_of(topology)]
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == kernels  # Mosaic kernels, no XLA fallback
  vmem = aot.kernel_vmem(compiled)
  assert len(vmem) == kernels, vmem
  for name, (used, granted, end) in vmem.items():
    assert 0 < used <= granted <= tiling.VMEM_LIMIT, (name, used, granted)
    assert end <= chip.vmem_bytes, (name, end)
  assert aot.hbm_bytes(compiled) < chip.hbm_bytes


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("k,n", [(D, F), (F, D)])
def test_gmm_forward_and_backward_compile_and_fit(topology, k, n):
  shapes = [((M, k), jnp.bfloat16), ((G, k, n), jnp.bfloat16), ((G,), jnp.int32), ((M, n), jnp.bfloat16)]
  forward = lambda lhs, rhs, sizes, _: pk.gmm(lhs, rhs, sizes, backend="pallas")
  _check(topology, aot.compile_on(topology, forward, *shapes), kernels=1)
  _check(topology, aot.compile_on(topology, _fwd_bwd(), *shapes), kernels=3)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_expert_parallel_odd_rows_and_float32_kernels_compile(topology):
  local, m = 8, M - 3  # an 8-way expert-parallel shard of 64 experts; rows not a multiple of any tile
  shapes = [((m, D), jnp.bfloat16), ((local, D, F), jnp.bfloat16), ((G,), jnp.int32), ((m, F), jnp.bfloat16)]
  _check(topology, aot.compile_on(topology, _fwd_bwd(group_offset=16), *shapes), kernels=3)
  shapes32 = [((4096, 1024), jnp.float32), ((16, 1024, 512), jnp.float32), ((16,), jnp.int32),
              ((4096, 512), jnp.float32)]
  _check(topology, aot.compile_on(topology, _fwd_bwd(), *shapes32), kernels=3)


@pytest.mark.slow
def test_token_choice_moe_layer_compiles_with_the_kernels_on_v5p():
  """The model's token-choice MoE layer (another module's code) at the reference size, forward
  and backward, with backend "pallas": 3 grouped matmuls forward, 6 kernels backward."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  demo = repo_module("demo")
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  cfg = demo.get_config("tc").model
  cfg.d_model, cfg.dtype = D, "bfloat16"
  cfg.moe.num_experts, cfg.moe.expert_mlp_dim, cfg.moe.top_k, cfg.moe.num_shared_experts = G, F, 2, 0
  cfg.moe.backend = "pallas"
  with nnx.use_eager_sharding(False):
    layer = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(p, x):
    y, _, _ = nnx.merge(graphdef, p)(x, jnp.ones(x.shape[:2], bool))
    return jnp.sum(y.astype(jnp.float32))

  x = jax.ShapeDtypeStruct((4, 2048, D), jnp.bfloat16)
  compiled = aot.compile_on("v5p:2x2x1", jax.grad(loss, argnums=(0, 1)), params, x)
  _check("v5p:2x2x1", compiled, kernels=9)
