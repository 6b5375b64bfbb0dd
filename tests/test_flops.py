"""Analytic FLOPs vs XLA's count of the compiled forward pass (no hidden dispatch waste)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sdlm_jax.config_files import repo_module
from sdlm_jax.model.transformer import Transformer
from sdlm_jax.scaling.flops import flops_per_token, param_counts

demo = repo_module("demo")

BATCH, LENGTH = 2, 128


def _compiled_forward_flops(cfg):
  # XLA's cost analysis counts a scan body once: compile the layers unrolled (the same math).
  cfg = cfg.copy_and_resolve_references()
  cfg.scan_layers = False
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  cost = fwd.lower(state, jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), model


def _expert_flops(cfg):
  """Forward FLOPs of the routed experts' matmuls over the batch (top_k experts per token)."""
  moe = cfg.moe
  return 2 * 3 * cfg.d_model * moe.expert_mlp_dim * moe.top_k * BATCH * LENGTH * cfg.num_layers


@pytest.mark.parametrize("variant", ["dense", "ec", "tc"])
def test_compiled_forward_flops_match_analytic(variant):
  cfg = demo.get_config(variant).model
  compiled, model = _compiled_forward_flops(cfg)
  analytic = flops_per_token(cfg, LENGTH, training=False) * BATCH * LENGTH
  if variant == "tc":
    # CPU runs TC's grouped matmul through the XLA reference (padded row tiles, or ragged_dot
    # costed as dense over all E experts): above the analytic count, at worst by (E - 1) x the
    # routed experts' FLOPs (every routed row multiplied by every expert).
    overhead = (cfg.moe.num_experts - 1) * _expert_flops(cfg)
    assert analytic < compiled <= 1.1 * analytic + overhead, (compiled, analytic)
  else:
    assert 0.95 <= compiled / analytic <= 1.10, (compiled, analytic)
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert param_counts(cfg)["total"] == counted
  assert flops_per_token(cfg, LENGTH, training=True) == 3 * flops_per_token(cfg, LENGTH, training=False)


def test_active_params_leave_out_unused_experts_only():
  ec, dense = demo.get_config("ec").model, demo.get_config("dense").model
  counts = param_counts(ec)
  unused = (ec.moe.num_experts - ec.moe.top_k) * 3 * ec.d_model * ec.moe.expert_mlp_dim * ec.num_layers
  assert counts["total"] - counts["active"] == unused
  assert counts["embedding"] == ec.vocab_size * ec.d_model
  assert param_counts(dense)["active"] == param_counts(dense)["total"]


def test_ec_and_dense_demo_variants_have_equal_active_flops():
  ec, dense = demo.get_config("ec").model, demo.get_config("dense").model
  ratio = flops_per_token(ec, 128) / flops_per_token(dense, 128)
  assert ratio == pytest.approx(1.0, abs=0.01)  # only the router differs


def test_param_counts_include_the_time_embedding_and_selection_biases():
  cfg = demo.get_config("tc,smoke").model
  cfg.time_embedding, cfg.moe.bias_update_rate = True, 1e-3
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  base = demo.get_config("tc,smoke").model
  assert param_counts(cfg)["total"] == counted == param_counts(base)["total"] + 2 * 64 * 64 + 2 * 4
