"""The Pallas gmm kernels compile for real TPUs (Mosaic, through libtpu) on this CPU host.

A kernel Mosaic rejects fails here. Sizes are realistic for an MoE layer: 16384 routed rows,
d_model 2048, expert FFN 1024, 64 experts, bf16, forward and backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels as pk

pytestmark = pytest.mark.tpu_aot
topologies = pytest.importorskip("jax.experimental.topologies")

HBM_GIB = {"v5e": 16, "v5p": 95, "v6e": 32}
M, K, N, G = 16384, 2048, 1024, 64


def _compile(topology, fn, *shapes):
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  mesh = Mesh(np.array(desc.devices[:1]), ("x",))
  replicated = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
  with pk.compile_for("tpu"):
    return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_gmm_forward_and_backward_compile_and_fit(topology):
  shapes = [((M, K), jnp.bfloat16), ((G, K, N), jnp.bfloat16), ((G,), jnp.int32), ((M, N), jnp.bfloat16)]

  def forward(lhs, rhs, sizes, _):
    return pk.gmm(lhs, rhs, sizes, backend="pallas")

  def backward(lhs, rhs, sizes, cot):
    return jax.vjp(lambda a, b: pk.gmm(a, b, sizes, backend="pallas"), lhs, rhs)[1](cot)

  for fn in (forward, backward):
    compiled = _compile(topology, fn, *shapes)
    text = compiled.as_text()
    assert "tpu_custom_call" in text  # the Mosaic kernel, not an XLA fallback
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    assert total < HBM_GIB[topology.split(":")[0]] * 2**30
