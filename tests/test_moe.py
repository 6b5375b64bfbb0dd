"""The whole MoE layer against a naive float64 loop over tokens and experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from pallas_kernels import target
from sdlm_jax.config_files import repo_module
from sdlm_jax.model.moe import MoE, batch_shards, ec_num_groups
from sdlm_jax.parallel.rules import MESH_AXES, get_rules
from tests.test_routing import ec_reference

demo = repo_module("demo")


def _cfg(router, group="sequence", shared=1, activation="softmax"):
  cfg = demo.get_config("ec,smoke").model
  cfg.dtype = "float32"
  cfg.moe.router = router
  cfg.moe.ec_group = group
  cfg.moe.num_shared_experts = shared
  cfg.moe.router_activation = activation
  cfg.moe.routed_scaling_factor = 1.5
  return cfg


def _swiglu(x, wg, wu, wd):
  g = x @ wg
  return (g / (1 + np.exp(-g)) * (x @ wu)) @ wd


def _scores(s, activation):
  return np.exp(s - s.max()) / np.exp(s - s.max()).sum() if activation == "softmax" else 1 / (1 + np.exp(-s))


def _reference(layer, cfg, x_BxLxD, mask_BxL):
  """Loops over tokens and their experts in float64; shared experts one by one."""
  moe = cfg.moe
  f64 = lambda v: np.asarray(v[...], np.float64)
  router, wg, wu, wd = f64(layer.router), f64(layer.w_gate), f64(layer.w_up), f64(layer.w_down)
  x = np.asarray(x_BxLxD, np.float64)
  b, l, d = x.shape
  flat_x, flat_mask = x.reshape(-1, d), mask_BxL.reshape(-1)
  logits = flat_x @ router
  routed = np.zeros_like(flat_x)
  if moe.router == "expert_choice":
    groups = b if moe.ec_group == "sequence" else 1
    _, picked, gates = ec_reference(logits.reshape(groups, -1, moe.num_experts).astype(np.float32),
                                    mask_BxL.reshape(groups, -1), moe.top_k, moe.router_activation)
    picked, gates = picked.reshape(b * l, -1), gates.reshape(b * l, -1)
    for i in range(b * l):
      n = picked[i].sum()
      factor = moe.dynamic_scaling_factors[n] if moe.dynamic_scaling_factors else 1.0
      for e in np.nonzero(picked[i])[0]:
        routed[i] += factor * gates[i, e] * _swiglu(flat_x[i], wg[e], wu[e], wd[e])
  else:
    bias = 0.0 if layer.selection_bias is None else f64(layer.selection_bias)
    for i in np.nonzero(flat_mask)[0]:
      p = _scores(logits[i], moe.router_activation)
      top = np.argsort(-(p + bias), kind="stable")[:moe.top_k]
      factor = moe.dynamic_scaling_factors[moe.top_k] if moe.dynamic_scaling_factors else 1.0
      for e, w in zip(top, p[top] / p[top].sum()):
        routed[i] += factor * w * _swiglu(flat_x[i], wg[e], wu[e], wd[e])
  y = routed * moe.routed_scaling_factor
  f = moe.expert_mlp_dim
  for s in range(moe.num_shared_experts):
    cols = slice(s * f, (s + 1) * f)
    sh = layer.shared
    y += _swiglu(flat_x, f64(sh.w_gate)[:, cols], f64(sh.w_up)[:, cols], f64(sh.w_down)[cols])
  return np.where(flat_mask[:, None], y, 0.0).reshape(b, l, d)


def _layer_and_inputs(cfg):
  """The layer (seed 0) and a [2, 16] batch whose second row ends in 4 padding tokens."""
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 16, cfg.d_model)).astype(np.float32)
  mask = np.ones((2, 16), bool)
  mask[1, 12:] = False
  return layer, x, mask


@pytest.mark.parametrize("router,group,activation,shared", [
    ("expert_choice", "sequence", "softmax", 1),
    ("expert_choice", "batch", "sigmoid", 2),
    ("token_choice", "sequence", "softmax", 1),
    ("token_choice", "sequence", "sigmoid", 0),
])
def test_moe_layer_matches_naive_loop(router, group, activation, shared):
  cfg = _cfg(router, group, shared, activation)
  layer, x, mask = _layer_and_inputs(cfg)
  y, losses, stats = nnx.jit(lambda m, a, b: m(a, b))(layer, jnp.asarray(x), jnp.asarray(mask))
  ref = _reference(layer, cfg, x, mask)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-5)
  assert np.all(np.asarray(y)[~mask] == 0)
  assert np.isfinite(float(losses["load_balance_loss"])) and np.isfinite(float(losses["z_loss"]))
  assert float(jnp.sum(stats["expert_load"])) == pytest.approx(1.0)
  if router == "token_choice":
    assert float(stats["experts_per_token_min"]) == float(stats["experts_per_token_max"]) == cfg.moe.top_k


@pytest.mark.parametrize("group", ["sequence", "batch"])
def test_expert_major_cpu_layout_equals_the_accelerator_layout(group):
  """CPU runs the EC experts on an [E, G*C, D] buffer, accelerators on [G, E, C, D] (moe._experts):
  the same outputs and gradients, and both match the float64 loop."""
  cfg = _cfg("expert_choice", group)
  layer, x_np, mask_np = _layer_and_inputs(cfg)
  x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)

  def value_and_grads(platform):
    def loss(m, a):
      y, _, _ = m(a, mask)
      return jnp.sum(jnp.sin(y)), y
    with target.compile_for(platform):  # the layout is chosen while tracing
      (_, y), (g_layer, g_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(layer, x)
    return y, g_x, nnx.state(g_layer, nnx.Param)

  y_cpu, gx_cpu, gw_cpu = value_and_grads("cpu")
  y_acc, gx_acc, gw_acc = value_and_grads("gpu")
  np.testing.assert_allclose(np.asarray(y_cpu), _reference(layer, cfg, x_np, mask_np),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(y_cpu), np.asarray(y_acc), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gx_cpu), np.asarray(gx_acc), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(gw_cpu), jax.tree.leaves(gw_acc)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(gw_cpu["w_up"][...]))) > 0  # the experts' weights do get gradients


@pytest.mark.parametrize("router,group", [("expert_choice", "sequence"), ("expert_choice", "batch"),
                                          ("token_choice", "sequence")])
def test_dynamic_scaling_factors_match_naive_loop(router, group):
  cfg = _cfg(router, group)
  cfg.moe.dynamic_scaling_factors = (7.0, 0.5, 2.0, 3.0, 0.25)  # E = 4; entry 0 never applies (no output)
  layer, x, mask = _layer_and_inputs(cfg)
  y, _, stats = nnx.jit(lambda m, a, b: m(a, b))(layer, jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), _reference(layer, cfg, x, mask), rtol=2e-4, atol=2e-5)
  if router == "expert_choice":  # the tokens got different numbers of experts, so the table mattered
    assert float(stats["experts_per_token_max"]) > float(stats["experts_per_token_min"])
    plain = _cfg(router, group)
    y_plain, _, _ = nnx.jit(lambda m, a, b: m(a, b))(MoE(plain, rngs=nnx.Rngs(0)), jnp.asarray(x), jnp.asarray(mask))
    assert not np.allclose(np.asarray(y), np.asarray(y_plain))


def test_token_choice_selection_bias_in_the_layer_matches_naive_loop():
  cfg = _cfg("token_choice")
  cfg.moe.bias_update_rate = 1e-3
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  layer.selection_bias[...] = jnp.asarray(np.random.default_rng(5).normal(size=cfg.moe.num_experts) * 0.3,
                                          jnp.float32)
  x = np.random.default_rng(0).normal(size=(2, 16, cfg.d_model)).astype(np.float32)
  mask = np.ones((2, 16), bool)
  y, _, _ = nnx.jit(lambda m, a, b: m(a, b))(layer, jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), _reference(layer, cfg, x, mask), rtol=2e-4, atol=2e-5)
  assert MoE(_cfg("token_choice"), rngs=nnx.Rngs(0)).selection_bias is None  # rate 0: no such param


def test_moe_layer_gradients_are_finite_under_jit():
  cfg = _cfg("expert_choice")
  graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(1)), nnx.Param)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, cfg.d_model)), jnp.float32)
  mask = jnp.ones((2, 16), bool).at[0, 10:].set(False)

  def loss(p):
    y, losses, _ = nnx.merge(graphdef, p)(x, mask)
    return jnp.sum(y ** 2) + losses["load_balance_loss"] + losses["z_loss"]
  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads["router"][...]).sum()) > 0  # the router learns through the gates


def test_batch_level_groups_are_the_batch_shards_of_the_active_mesh():
  assert batch_shards() == 1  # no mesh, no rules
  mesh = AbstractMesh((2, 4, 2, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(get_rules()):
    assert batch_shards() == 16  # activation_batch -> (data, fsdp, expert)
  assert ec_num_groups("batch", 16, 8) == 8
  assert ec_num_groups("batch", 3, 8) == 1  # an unsharded odd batch is one group
  assert ec_num_groups("sequence", 16, 8) == 16
  with pytest.raises(ValueError, match="model.moe.ec_group"):
    ec_num_groups("global", 16, 8)
