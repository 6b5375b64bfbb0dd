"""Analytic FLOPs vs XLA's count of the compiled forward pass (no hidden dispatch waste)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import demo
from sdlm_jax.model.transformer import Transformer
from sdlm_jax.scaling.flops import flops_per_token, param_counts


def _compiled_forward_flops(cfg, batch, length):
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  compiled = fwd.lower(state, jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), model


@pytest.mark.parametrize("variant", ["dense", "ec"])
def test_compiled_forward_flops_within_10_percent_of_analytic(variant):
  cfg = demo.get_config(variant).model
  cfg.dtype = "float32"
  batch, length = 2, 128
  compiled, model = _compiled_forward_flops(cfg, batch, length)
  analytic = flops_per_token(cfg, length, training=False) * batch * length
  assert 0.95 <= compiled / analytic <= 1.10, (compiled, analytic)
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert param_counts(cfg)["total"] == counted


def test_ec_and_dense_demo_variants_have_equal_active_flops():
  ec, dense = demo.get_config("ec").model, demo.get_config("dense").model
  ratio = flops_per_token(ec, 128) / flops_per_token(dense, 128)
  assert ratio == pytest.approx(1.0, abs=0.01)  # only the router differs
  assert param_counts(ec)["total"] > 2 * param_counts(dense)["total"] - param_counts(dense)["embedding"]
