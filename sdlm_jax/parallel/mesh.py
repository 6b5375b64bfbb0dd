"""Device mesh over the axes (data, fsdp, expert, model), within and across slices.

`mesh.{data,fsdp,expert,model}` are the axis sizes inside one slice (ICI, the fast torus) and
`mesh.dcn_{data,fsdp,expert,model}` the sizes across slices (DCN, the data-centre network);
an axis's full size is the product of the two. In each group at most one entry may be -1: it
fills the devices of a slice, or the number of slices. A single slice (every CPU or GPU
machine, one TPU slice) has dcn sizes of 1. Over several slices the devices are arranged
with `mesh_utils.create_hybrid_device_mesh`, so every axis whose dcn size is 1 stays inside a
slice; keep the chatty axes (model, expert, fsdp) there and put data across slices.
"""

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType

from sdlm_jax.parallel.rules import MESH_AXES, get_rules

DCN_FIELDS = tuple(f"dcn_{a}" for a in MESH_AXES)


def _resolve(sizes: dict, total: int, what: str) -> tuple[int, ...]:
  """Fills the single -1 of `sizes` (field name -> size) so that the product is `total`."""
  for name, s in sizes.items():
    if not isinstance(s, int) or s == 0 or s < -1:
      raise ValueError(f"mesh.{name}={s!r}; allowed values: a positive size or -1 (fill)")
  fill = [name for name, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: only one of {', '.join(sizes)} may be -1, got {', '.join(fill)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  out = dict(sizes)
  if fill:
    if total % known:
      raise ValueError(f"mesh: {total} {what} are not divisible by the fixed sizes' product {known} "
                       f"({', '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)})")
    out[fill[0]] = total // known
  if math.prod(out.values()) != total:
    raise ValueError(f"mesh: {', '.join(f'{k}={v}' for k, v in out.items())} need {math.prod(out.values())} "
                     f"{what}, but there are {total}")
  return tuple(out.values())


def num_slices_of(devices) -> int:
  """How many slices the devices span (TPU devices carry slice_index; others are one slice)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def ici_dcn_shapes(mesh_cfg, num_devices: int, num_slices: int = 1):
  """(per-slice sizes, across-slice sizes) of the axes, each a tuple in MESH_AXES order."""
  if num_devices % num_slices:
    raise ValueError(f"mesh: {num_devices} devices do not split evenly over {num_slices} slices")
  ici = _resolve({a: int(mesh_cfg[a]) for a in MESH_AXES}, num_devices // num_slices, "devices per slice")
  dcn = _resolve({f: int(mesh_cfg.get(f, 1)) for f in DCN_FIELDS}, num_slices, "slices")
  return ici, dcn


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """The full size of each axis (ICI x DCN), in MESH_AXES order."""
  ici, dcn = ici_dcn_shapes(mesh_cfg, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The mesh for `devices` (default: all), arranged for the physical topology."""
  devices = list(devices if devices is not None else jax.devices())
  slices = num_slices_of(devices)
  ici, dcn = ici_dcn_shapes(mesh_cfg, len(devices), slices)
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":  # follow the torus so neighbours on an axis are neighbours on chip
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: str = "default"):
  """The mesh and the logical-axis rule set (`mesh.rules`) that sharded code runs under.

  Building a model with logical axis names, tracing the train step and initialising state on
  its shards all need both; this is the one place that enters them.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules(rules)):
    yield
