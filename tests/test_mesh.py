"""Mesh sizes within and across slices, and the hybrid (multi-slice) device arrangement."""

import numpy as np
import pytest

from sdlm_jax.defaults import get_base_config
from sdlm_jax.parallel.mesh import ici_dcn_shapes, make_mesh, mesh_shape


def _mesh_cfg(**sizes):
  cfg = get_base_config().mesh
  cfg.update(sizes)
  return cfg


def test_fill_values_resolve_per_slice_and_across_slices():
  cfg = _mesh_cfg(data=1, fsdp=-1, expert=2, dcn_data=-1)
  assert ici_dcn_shapes(cfg, 64, num_slices=4) == ((1, 8, 2, 1), (4, 1, 1, 1))
  assert mesh_shape(cfg, 64, num_slices=4) == (4, 8, 2, 1)
  assert mesh_shape(_mesh_cfg(), 8) == (8, 1, 1, 1)  # one slice: dcn sizes are all 1


@pytest.mark.parametrize("sizes, devices, slices, message", [
    (dict(data=-1, fsdp=-1), 8, 1, "only one of data, fsdp, expert, model may be -1"),
    (dict(data=3), 8, 1, "need 3 devices per slice"),
    (dict(data=-1, expert=3), 8, 1, "not divisible by the fixed sizes' product 3"),
    (dict(dcn_data=1), 16, 2, "need 1 slices"),
    (dict(model=0), 8, 1, "mesh.model=0"),
    (dict(), 9, 2, "do not split evenly over 2 slices"),
])
def test_bad_meshes_name_the_field(sizes, devices, slices, message):
  with pytest.raises(ValueError, match=message):
    ici_dcn_shapes(_mesh_cfg(**sizes), devices, slices)


@pytest.mark.tpu_aot
def test_two_slices_keep_ici_axes_inside_a_slice():
  topologies = pytest.importorskip("jax.experimental.topologies")
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2", num_slices=2).devices
  mesh = make_mesh(_mesh_cfg(data=1, fsdp=4, expert=2, dcn_data=-1), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 2, "model": 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert [set(np.unique(slice_of[i])) for i in range(2)] == [{0}, {1}]  # data crosses slices, nothing else
  assert len({d.id for d in mesh.devices.ravel()}) == 16
