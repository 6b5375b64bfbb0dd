"""Ahead-of-time compilation for real TPUs on a CPU host, and what the compiled program uses.

libtpu compiles for a TPU topology description (jax.experimental.topologies) without a TPU:
the real XLA TPU compiler and Mosaic run, so a kernel Mosaic rejects fails here. Used by the
AOT tests and benchmarks/kernels.py.
"""

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import target

_KERNEL_RE = re.compile(r'%([\w.-]+) = .*custom_call_target="tpu_custom_call"')
_SCOPED_RE = re.compile(r'"scoped_memory_configs":\[\{"memory_space":"1","offset":"(\d+)","size":"(\d+)"')
_USED_RE = re.compile(r'"used_scoped_memory_configs":\[\{"memory_space":"1","offset":"(\d+)","size":"(\d+)"')


def chip_of(topology: str) -> str:
  """"v5p:2x2x1" -> "v5p" (the names target.CHIPS uses)."""
  return topology.split(":")[0]


def replicated(topology: str) -> NamedSharding:
  """A one-device sharding on the first chip of `topology`."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return NamedSharding(Mesh(np.array(desc.devices[:1]), ("x",)), P())


def compile_on(topology: str, fn, *shapes, compiler_options=None):
  """Compiles fn for one chip of `topology`; shapes are (shape, dtype) pairs or pytrees of
  ShapeDtypeStruct. The kernels' backends and tiles are chosen for that chip."""
  sharding = replicated(topology)

  def spec(x):
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple):
      return jax.ShapeDtypeStruct(x[0], x[1], sharding=sharding)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), x)

  with target.compile_for("tpu", chip_of(topology)):
    return jax.jit(fn).lower(*[spec(s) for s in shapes]).compile(compiler_options=compiler_options)


def kernel_vmem(compiled) -> dict[str, tuple[int, int, int]]:
  """For each Mosaic kernel of the compiled program: (VMEM bytes the kernel uses, the scoped
  VMEM it was granted, the highest VMEM address in use while it runs), as libtpu reports
  them. XLA may keep its own buffers in the low part of VMEM and place the kernel's scoped
  region above them, so the kernel's use is the used end minus the region's offset."""
  out = {}
  for line in compiled.as_text().splitlines():
    name, scoped, used = _KERNEL_RE.search(line), _SCOPED_RE.search(line), _USED_RE.search(line)
    if name and scoped and used:
      offset, granted = int(scoped.group(1)), int(scoped.group(2))
      end = int(used.group(1)) + int(used.group(2))
      out[name.group(1)] = (end - offset, granted, end)
  return out


def hbm_bytes(compiled) -> int:
  """Arguments + outputs + temporaries of the compiled program, per chip."""
  mem = compiled.memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of the compiled program (flops, bytes accessed, optimal_seconds)."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def estimated_seconds(compiled) -> float:
  """XLA's cost-model estimate (per chip). Pallas kernels count only through their declared
  CostEstimate; the TPU cost model returns a negative figure for some programs (each
  SparseCore-offloaded scatter and each sliced VMEM prefetch counts -1 s; compile with
  sdlm_jax.aot.ESTIMATE_OPTIONS to avoid both), reported as NaN."""
  seconds = float(cost_analysis(compiled).get("optimal_seconds", float("nan")))
  return seconds if seconds >= 0 else float("nan")
