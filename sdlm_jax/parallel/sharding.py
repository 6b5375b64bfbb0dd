"""Logical sharding constraints on activations.

`constrain(x, ("activation_batch", "activation_length", "activation_embed"))` maps the logical
names through the active rules (`nnx.logical_axis_rules`) onto the active mesh
(`jax.set_mesh`) and pins the layout. With no mesh or no rules (unit tests, single-device
scripts) it is the identity, so model code never has to know where it runs.
"""

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P


def logical_to_spec(axes) -> P:
  return P(*core_spmd.from_sharding_rules(tuple(axes), core_spmd.get_logical_axis_rules()))


def spec_entry_axes(entry, mesh) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of the mesh axes it names that have size > 1."""
  names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
  return tuple(a for a in names if mesh.shape[a] > 1)


def mesh_axes_of(logical: str) -> tuple[str, ...]:
  """Mesh axes (size > 1) one logical axis is split over under the active mesh and rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not core_spmd.get_logical_axis_rules():
    return ()
  return spec_entry_axes(logical_to_spec((logical,))[0], mesh)


def constrain(x, axes):
  if not core_spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))
