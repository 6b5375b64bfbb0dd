"""Device mesh over the axes (data, fsdp, expert, model)."""

import math

import jax
import numpy as np
from jax.sharding import AxisType

from sdlm_jax.parallel.rules import MESH_AXES


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the per-axis sizes; at most one axis may be -1 (fills the remainder)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]  # other fields (e.g. rules) are not axes
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {fill}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a}={s}; allowed values: a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, "
        f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.sharding.Mesh(
      np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
