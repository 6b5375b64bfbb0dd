"""Two real train steps of the smoke model under each objective and routing option.

Each option is set as the command line would set it (a dotted config override), validated,
built into the train program and stepped twice: the loss must be finite and the params must
move. The math of each option is tested against its reference elsewhere (test_diffusion_losses,
test_routing, test_moe, test_uniform_kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdlm_jax.config import validate
from sdlm_jax.config_files import repo_module
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.train import program as program_lib

demo = repo_module("demo")


def _override(cfg, dotted: str, value):
  *path, field = dotted.split(".")
  node = cfg
  for name in path:
    node = node[name]
  node[field] = value


def two_steps(variant: str, **overrides):
  """(losses of two steps, the params before, the params after) of demo `variant`,smoke with overrides."""
  cfg = demo.get_config(f"{variant},smoke")
  cfg.train.batch_size, cfg.data.seq_len = 4, 32
  for dotted, value in overrides.items():
    _override(cfg, dotted.replace("__", "."), value)
  validate(cfg)
  program = program_lib.build(cfg, make_mesh(cfg.mesh))
  before = jax.device_get(program.params)
  params, opt_state, losses = program.params, program.opt_state, []
  with program.context():
    for step in range(2):
      params, opt_state, metrics = program.step(params, opt_state, program.synthetic_batch(step), jnp.int32(step))
      losses.append(float(metrics["total_loss"]))
  return losses, before, jax.device_get(params)


def _assert_trains(losses, before, after):
  assert all(np.isfinite(losses)), losses
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert any(moved)


@pytest.mark.parametrize("overrides", [
    {"diffusion__loss": "maskgit", "diffusion__schedule": "cosine"},
    {"diffusion__loss": "megadlm", "diffusion__schedule": "poly2"},
    {"diffusion__loss": "mdlm_elbo", "diffusion__t_sampling": "moving_gaussian"},
], ids=["maskgit-cosine", "megadlm-poly2", "elbo-moving-gaussian"])
def test_objective_trains_two_steps(overrides):
  _assert_trains(*two_steps("ec", **overrides))


def test_dynamic_scaling_factors_train_two_steps():  # token choice's use of the table: test_moe, the CLI test
  _assert_trains(*two_steps("ec", model__moe__dynamic_scaling_factors=(0.0, 1.0, 1.2, 1.4, 1.6)))


def _leaf(params, name):
  found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if name in jax.tree_util.keystr(path)]
  assert len(found) == 1, found
  return np.asarray(found[0])


@pytest.mark.parametrize("scan", [True, False])
def test_aux_free_bias_moves_by_the_sign_of_the_load_error_and_lives_in_the_params(scan):
  rate = 0.01
  cfg = demo.get_config("tc,smoke")
  cfg.train.batch_size, cfg.data.seq_len = 4, 32
  cfg.model.num_layers, cfg.model.moe.first_k_dense, cfg.model.scan_layers = 3, 1, scan
  cfg.model.moe.bias_update_rate = rate
  validate(cfg)
  program = program_lib.build(cfg, make_mesh(cfg.mesh))
  bias = lambda p: (_leaf(p, "selection_bias") if scan else
                    np.stack([_leaf(p, f"blocks'][{j}]['ffn']['selection_bias") for j in range(2)]))
  params, opt_state = program.params, program.opt_state
  expected = np.zeros((2, 4))
  with program.context():
    for step in range(2):
      params, opt_state, metrics = program.step(params, opt_state, program.synthetic_batch(step), jnp.int32(step))
      load = np.asarray(metrics["router/expert_load_per_layer"], np.float64)  # [2 MoE layers, 4 experts]
      expected += rate * np.sign(0.25 - load)
      np.testing.assert_allclose(bias(jax.device_get(params)), expected, atol=1e-7)
  assert np.abs(expected).sum() > 0  # the loads were uneven, so the biases moved


def test_uniform_kernel_trains_two_steps():
  _assert_trains(*two_steps("ec", diffusion__kernel="uniform", diffusion__loss="mdlm_elbo",
                            model__time_embedding=True, sample__block_size=0))
