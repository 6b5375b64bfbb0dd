"""On 8 fake CPU devices, every rule set gives the single-device loss and gradients.

Meshes with an expert axis run expert parallelism: EC's all_to_all of the dispatch buffer and
TC's padded all_to_all exchange inside its shard_map (the CPU has no ragged_all_to_all).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [  # (data, fsdp, expert, model, rules)
    (8, 1, 1, 1, "data"),
    (1, 8, 1, 1, "default"),
    (1, 4, 2, 1, "default"),
    (2, 2, 2, 1, "default"),  # expert buffers' groups split over data, fsdp and expert
    (1, 2, 2, 2, "default"),
]


def _run(variant, meshes):
  """One subprocess (8 fake devices) computes the step for every mesh; returns their results."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  specs = [",".join(map(str, m)) for m in meshes]
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multidevice_step.py"), variant, *specs],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == len(meshes)
  return [json.loads(line) for line in lines]


@pytest.mark.parametrize("variant", ["dense", "ec", "tc"])
def test_sharded_step_matches_single_device(variant):
  single, *results = _run(variant, [(1, 1, 1, 1, "default")] + MESHES)
  for mesh, sharded in zip(MESHES, results):
    assert abs(sharded["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"]), mesh
    for name, g in single["grads"].items():
      np.testing.assert_allclose(sharded["grads"][name], g, rtol=1e-4, atol=1e-6, err_msg=f"{mesh} {name}")
    if mesh[-1] != "data":
      assert any("fsdp" in s for s in sharded["param_specs"]), sharded["param_specs"]  # really sharded
    # Expert parallelism moves tokens with all-to-all, and only when experts are split.
    assert (sharded["all_to_all"] > 0) == (variant != "dense" and mesh[2] > 1), (mesh, sharded["all_to_all"])
