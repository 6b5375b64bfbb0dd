"""The whole MoE layer against a naive float64 loop over tokens and experts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from sdlm_jax.model.moe import MoE
from tests.test_routing import ec_reference


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


def _reference(layer, cfg, x_BxLxD, mask_BxL):
  p = {k: np.asarray(v, np.float64) for k, v in
       (("router", layer.router[...]), ("wg", layer.w_gate[...]), ("wu", layer.w_up[...]), ("wd", layer.w_down[...]))}
  x = np.asarray(x_BxLxD, np.float64)
  b, l, d = x.shape
  logits = x @ p["router"]
  y = np.zeros_like(x)
  moe = cfg.moe
  if moe.router == "expert_choice":
    groups = (x, logits, mask_BxL) if moe.ec_group == "sequence" else (
        x.reshape(1, b * l, d), logits.reshape(1, b * l, -1), mask_BxL.reshape(1, -1))
    xg, lg, mg = groups
    _, picked, gates = ec_reference(lg.astype(np.float32), mg, moe.top_k, moe.router_activation)
    yg = np.zeros_like(xg)
    for g in range(xg.shape[0]):
      for i in range(xg.shape[1]):
        for e in np.nonzero(picked[g, i])[0]:
          yg[g, i] += gates[g, i, e] * _swiglu(xg[g, i], p["wg"][e], p["wu"][e], p["wd"][e])
    y = yg.reshape(b, l, d)
  else:
    flat, lf = x.reshape(-1, d), logits.reshape(-1, logits.shape[-1])
    yf = np.zeros_like(flat)
    for i in range(flat.shape[0]):
      if not mask_BxL.reshape(-1)[i]:
        continue
      s = lf[i]
      probs = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      top = np.argsort(-probs, kind="stable")[:moe.top_k]
      for e, w in zip(top, probs[top] / probs[top].sum()):
        yf[i] += w * _swiglu(flat[i], p["wg"][e], p["wu"][e], p["wd"][e])
    y = yf.reshape(b, l, d)
  y = y * moe.routed_scaling_factor
  if layer.shared is not None:
    s = layer.shared
    y = y + _swiglu(x, np.asarray(s.w_gate[...], np.float64), np.asarray(s.w_up[...], np.float64),
                    np.asarray(s.w_down[...], np.float64))
  return y


@pytest.mark.parametrize("router,group,shared", [
    ("expert_choice", "sequence", 1), ("expert_choice", "batch", 0), ("token_choice", "sequence", 1)])
def test_moe_layer_matches_naive_loop(router, group, shared):
  cfg = _cfg(router, group, shared)
  with nnx.use_eager_sharding(False):
    layer = MoE(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, cfg.d_model)).astype(np.float32)
  mask = np.ones((2, 16), bool)
  mask[1, 12:] = False
  y, losses, stats = layer(jnp.asarray(x), jnp.asarray(mask))
  ref = _reference(layer, cfg, x, mask)
  np.testing.assert_allclose(np.asarray(y)[mask], ref[mask], rtol=2e-4, atol=2e-5)
  assert np.isfinite(float(losses["load_balance_loss"])) and np.isfinite(float(losses["z_loss"]))
  assert float(stats["experts_per_token_min"]) >= 0


def test_expert_choice_ops_are_xla_on_every_platform_including_tpu():
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  with pallas_kernels.compile_for("tpu"):  # resolve backends as a TPU host would
    idx, _ = pallas_kernels.expert_choice(jnp.zeros((1, 8, 2)), 4)
    y = pallas_kernels.ec_dispatch(jnp.ones((1, 8, 3)), idx)
  assert idx.shape == (1, 2, 4) and y.shape == (1, 2, 4, 3)
  with pytest.raises(NotImplementedError, match="does not exist"):
    pallas_kernels.expert_choice(jnp.zeros((1, 8, 2)), 4, backend="pallas")
