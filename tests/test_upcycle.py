"""Upcycling a dense model into an MoE (sdlm-upcycle, train.init_from): at step 0 the upcycled
model computes the dense model's function, coarse (experts = copies) and fine-grained (experts
= shards of the dense FFN, shared experts taking the first units)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sdlm_jax import config_files, upcycle
from sdlm_jax.export import tensor_names
from sdlm_jax.train.restore import single_device_mesh
from sdlm_jax.train.state import init_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def _model(variant, **moe):
  cfg = config_files.load(f"{REPO}/configs/demo.py:{variant},smoke")
  for key, value in moe.items():
    cfg.model.moe[key] = value
  return cfg, init_model(cfg, single_device_mesh())


def _flat(model, cfg):
  return tensor_names.flatten(jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))), cfg.model)


def _upcycled(dense_cfg, dense, moe_cfg, moe):
  flat = upcycle.upcycle(_flat(dense, dense_cfg), dense_cfg.model, _flat(moe, moe_cfg), moe_cfg.model, seed=3)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  template = nnx.to_pure_dict(params)
  nnx.replace_by_pure_dict(params, tensor_names.unflatten(flat, template, moe_cfg.model, np.stack))
  return nnx.merge(graphdef, params, rest), flat


# (name, router, moe overrides): the demo's dense smoke FFN is 192 wide
CASES = [
    ("coarse_tc", "tc", dict(num_shared_experts=0, expert_mlp_dim=192, num_experts=4, top_k=2)),
    ("fine_tc_shared", "tc", dict(num_shared_experts=1, expert_mlp_dim=64, num_experts=4, top_k=2)),
    ("fine_tc_4_shards", "tc", dict(num_shared_experts=0, expert_mlp_dim=48, num_experts=8, top_k=4)),
    ("fine_ec_every_token_picked", "ec", dict(num_shared_experts=1, expert_mlp_dim=64, num_experts=4, top_k=4)),
]


@pytest.mark.parametrize("name,router,moe", CASES, ids=[c[0] for c in CASES])
def test_upcycled_logits_equal_the_dense_models_at_step_0(name, router, moe):
  dense_cfg, dense = _model("dense")
  moe_cfg, fresh = _model(router, **moe)
  upcycled, flat = _upcycled(dense_cfg, dense, moe_cfg, fresh)
  tokens = np.random.default_rng(0).integers(5, 512, (3, 32)).astype(np.int32)
  want = np.asarray(_forward(dense, tokens))
  np.testing.assert_allclose(np.asarray(_forward(upcycled, tokens)), want, atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(_forward(fresh, tokens)) - want).max() > 1e-2  # a fresh MoE is another function
  shards = upcycle.shard_count(dense_cfg.model, moe_cfg.model)
  router = flat["layers.0.ffn.router"]
  for e in range(moe["num_experts"]):  # the experts of a virtual group share one router column
    np.testing.assert_array_equal(router[:, e], router[:, e - e % shards])


def test_expert_shards_are_the_dense_ffns_units_hand_case():
  """Dense FFN of width 6 (units 0..5), shared width 2, experts of width 2: G = 2 shards."""
  d = 3
  dense = {"w_gate": np.arange(d * 6, dtype=np.float32).reshape(d, 6),
           "w_up": -np.arange(d * 6, dtype=np.float32).reshape(d, 6),
           "w_down": np.arange(6 * d, dtype=np.float32).reshape(6, d)}
  experts = upcycle._routed_experts(dense, shared=2, width=2, shards=2, num_experts=4)  # pylint: disable=protected-access
  for e, units in enumerate([(2, 3), (4, 5), (2, 3), (4, 5)]):
    np.testing.assert_array_equal(experts["w_gate"][e], dense["w_gate"][:, units])
    np.testing.assert_array_equal(experts["w_up"][e], dense["w_up"][:, units])
    np.testing.assert_array_equal(experts["w_down"][e], 2 * dense["w_down"][list(units), :])


def test_mismatched_shapes_are_refused_naming_the_field():
  dense_cfg, _ = _model("dense")
  moe_cfg, _ = _model("tc")
  moe_cfg.model.moe.expert_mlp_dim = 40
  with pytest.raises(upcycle.UpcycleError, match="multiple of the expert width model.moe.expert_mlp_dim=40"):
    upcycle.shard_count(dense_cfg.model, moe_cfg.model)
  moe_cfg, _ = _model("tc")
  moe_cfg.model.d_model = 32
  with pytest.raises(upcycle.UpcycleError, match="model.d_model: the dense run has 64, the MoE config 32"):
    upcycle.check_backbone(dense_cfg.model, moe_cfg.model)
  moe_cfg, _ = _model("tc")
  moe_cfg.model.moe.top_k = 3
  with pytest.raises(upcycle.UpcycleError, match="top_k=3 must be a multiple of the 2 shards"):
    upcycle.shard_count(dense_cfg.model, moe_cfg.model)


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", f"sdlm_jax.cli.{module}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.slow
def test_upcycle_cli_then_training_starts_from_the_upcycled_weights(tmp_path):
  cache = f"--config.data.data_dir={tmp_path / 'cache'}"
  dense_run, out = str(tmp_path / "dense"), str(tmp_path / "moe")
  assert _cli("train", f"--config={REPO}/configs/demo.py:dense,smoke", f"--workdir={dense_run}", cache,
              "--config.train.num_steps=2").returncode == 0
  moe_config = f"--config={REPO}/configs/demo.py:tc,smoke"
  up = _cli("upcycle", f"--from={dense_run}", moe_config, f"--out={out}", cache)
  assert up.returncode == 0, up.stderr[-2000:]
  assert "2 shards per copy of the dense FFN" in up.stdout
  init = os.path.join(out, "upcycled")
  train = _cli("train", moe_config, f"--workdir={out}", cache, f"--config.train.init_from={init}",
               "--config.train.num_steps=2")
  assert train.returncode == 0, train.stderr[-2000:]
  assert f"Initialised the weights from {init}" in train.stdout
  assert json.load(open(os.path.join(out, "config.json")))["train"]["init_from"] == init
  again = _cli("upcycle", f"--from={dense_run}", moe_config, f"--out={out}", cache)  # never overwrites
  assert again.returncode == 2 and "exists and is not empty" in again.stderr
  wrong = _cli("upcycle", f"--from={dense_run}", f"--config={REPO}/configs/demo.py:tc,smoke",
               "--config.model.d_model=32", "--config.model.mlp_dim=96", f"--out={tmp_path / 'x'}", cache)
  assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "model.d_model" in wrong.stderr, wrong.stderr
