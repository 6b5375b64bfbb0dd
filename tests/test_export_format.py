"""Export format pieces without a training run: flat tensor names (the same for scanned and
unrolled models), safetensors shards and bfloat16, the NumPy reference on a fresh model,
the jax.export artifact, and one-line errors for bad arguments."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.config_files import repo_module
from sdlm_jax.export import directory, forward, safetensors_io, tensor_names
from sdlm_jax.export.errors import ExportInputError
from sdlm_jax.model.transformer import Transformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward  # noqa: E402  pylint: disable=wrong-import-position

demo = repo_module("demo")


def _model_cfg(scan: bool, **moe):
  """A 3-layer model with one dense then two MoE layers (two stacks), untied head, GQA."""
  cfg = demo.get_config("tc,smoke").model
  cfg.num_layers = 3
  cfg.scan_layers = scan
  cfg.tie_embeddings = False
  cfg.moe.first_k_dense = 1
  cfg.moe.routed_scaling_factor = 1.5
  cfg.moe.update(moe)
  return cfg


def _pure(model):
  return jax.device_get(nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]))


def _batch(vocab, batch=2, length=12, seed=0):
  """Two rows: packed documents with restarting positions and padding; one whole document."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, vocab, (batch, length)).astype(np.int32)
  seg = np.ones((batch, length), np.int32)
  pos = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  cut, pad = length // 2, length - 2
  seg[0, cut:] = 2
  seg[0, pad:] = 0
  pos[0, cut:] = np.arange(length - cut)
  return tokens, seg, pos


_forward = nnx.jit(lambda model, t, s, p: model(t, segment_ids_BxL=s, positions_BxL=p)[0])


def _logits(model, tokens, seg, pos):
  return np.asarray(_forward(model, tokens, seg, pos))


def _expected_names(cfg) -> set:
  """The README table, written out independently of tensor_names."""
  names = {"embed", "final_norm.scale"} | ({"lm_head"} if not cfg.tie_embeddings else set())
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    names |= {p + s for s in ("attn_norm.scale", "ffn_norm.scale", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
                              "attn.q_norm.scale", "attn.k_norm.scale", "ffn.w_gate", "ffn.w_up", "ffn.w_down")}
    if i >= cfg.moe.first_k_dense:
      names.add(p + "ffn.router")
      if cfg.moe.num_shared_experts:
        names |= {p + "ffn.shared.w_gate", p + "ffn.shared.w_up", p + "ffn.shared.w_down"}
  return names


def test_scanned_and_unrolled_models_export_the_same_names_and_load_each_other():
  unrolled = Transformer(_model_cfg(scan=False), rngs=nnx.Rngs(0))
  scanned = Transformer(_model_cfg(scan=True), rngs=nnx.Rngs(1))
  flat_u = tensor_names.flatten(_pure(unrolled), _model_cfg(scan=False))
  flat_s = tensor_names.flatten(_pure(scanned), _model_cfg(scan=True))
  assert set(flat_u) == set(flat_s) == _expected_names(_model_cfg(scan=False))
  assert {n: a.shape for n, a in flat_u.items()} == {n: a.shape for n, a in flat_s.items()}
  assert flat_u["layers.2.ffn.w_gate"].shape == (4, 64, 64)  # [E, D, F]: MoE layer 2 is the MoE stack's 2nd
  assert flat_u["layers.0.ffn.w_gate"].shape == (64, 192)  # the dense layer
  # The unrolled model's tensors, loaded into the scanned layout, give the unrolled model's logits.
  graphdef, state = nnx.split(scanned)
  tree = tensor_names.unflatten(flat_u, nnx.to_pure_dict(state), _model_cfg(scan=True), np.stack)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
  batch = _batch(512)
  np.testing.assert_array_equal(_logits(nnx.merge(graphdef, state), *batch), _logits(unrolled, *batch))
  # Layer 1 of the scanned stack is global layer 2.
  np.testing.assert_array_equal(np.asarray(scanned.stacks[1].blocks.attn.wq[...])[1],
                                tensor_names.flatten(_pure(scanned), _model_cfg(scan=True))["layers.2.attn.wq"])


def test_unflatten_names_a_missing_an_extra_and_a_misshaped_tensor():
  cfg = _model_cfg(scan=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  template = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
  flat = tensor_names.flatten(_pure(model), cfg)
  with pytest.raises(ExportInputError, match="'layers.1.attn.wk' is missing"):
    tensor_names.unflatten({k: v for k, v in flat.items() if k != "layers.1.attn.wk"}, template, cfg, np.stack)
  with pytest.raises(ExportInputError, match="'layers.7.attn.wk' is not a param"):
    tensor_names.unflatten({**flat, "layers.7.attn.wk": flat["layers.1.attn.wk"]}, template, cfg, np.stack)
  with pytest.raises(ExportInputError, match=r"'embed' has shape \(3, 64\)"):
    tensor_names.unflatten({**flat, "embed": np.zeros((3, 64), np.float32)}, template, cfg, np.stack)


def test_safetensors_shards_above_the_limit_and_keeps_bfloat16(tmp_path):
  rng = np.random.default_rng(0)
  flat = {f"layers.{i}.w": rng.normal(size=(10, 10)).astype(ml_dtypes.bfloat16) for i in range(12)}
  flat["embed"] = rng.normal(size=(100, 10)).astype(np.float32)  # 4000 bytes: larger than a shard
  written = safetensors_io.write(flat, tmp_path, max_shard_bytes=1000)
  index = json.loads((tmp_path / safetensors_io.INDEX_FILE).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert written == shards + [safetensors_io.INDEX_FILE] and len(shards) > 2
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in flat.values())
  for name in shards:
    held = safetensors_io.read_file(tmp_path / name)
    assert len(held) == 1 or sum(a.nbytes for a in held.values()) <= 1000
  # layers.2 before layers.10: numeric order within the shards
  assert index["weight_map"]["layers.2.w"] <= index["weight_map"]["layers.10.w"]
  back = safetensors_io.read(tmp_path)
  assert set(back) == set(flat)
  for name, a in flat.items():
    assert back[name].dtype == a.dtype
    np.testing.assert_array_equal(back[name], a)
  # The NumPy reference's own parser reads the same values.
  ref = numpy_forward.read_weights(str(tmp_path))
  for name, a in flat.items():
    np.testing.assert_array_equal(ref[name], a.astype(np.float64))
  single = tmp_path / "single"
  single.mkdir()
  assert safetensors_io.write(flat, single) == [safetensors_io.SINGLE_FILE]


@pytest.mark.parametrize("moe", [{"router": "token_choice"}, {"router": "expert_choice", "num_shared_experts": 1},
                                 {"router": "expert_choice", "ec_group": "batch",
                                  "router_activation": "sigmoid"}, {"num_experts": 0}],
                         ids=["tc", "ec", "ec_batch_sigmoid", "dense"])
def test_numpy_reference_and_jax_export_match_the_model(tmp_path, moe):
  cfg = _model_cfg(scan=True, **moe)
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  flat = tensor_names.flatten(_pure(model), cfg)
  safetensors_io.write(flat, tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
  batch = _batch(cfg.vocab_size)
  expected = _logits(model, *batch)
  np.testing.assert_allclose(numpy_forward.forward(str(tmp_path), *batch), expected, rtol=1e-4, atol=1e-5)
  exported = forward.export_forward(cfg, directory.param_specs_of(flat), platforms=("cpu",))
  forward.write(exported, tmp_path / "f.jax_export")
  loaded = forward.load(tmp_path / "f.jax_export")
  np.testing.assert_allclose(np.asarray(loaded.call(flat, *batch)), expected, rtol=1e-5, atol=1e-6)
  other = _batch(cfg.vocab_size, batch=3, length=7, seed=1)  # another batch and length, same artifact
  np.testing.assert_allclose(np.asarray(loaded.call(flat, *other)), _logits(model, *other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_time_embedding_bias_and_scaling_factors_export_and_match_numpy(tmp_path, router):
  cfg = _model_cfg(scan=True, router=router, dynamic_scaling_factors=(0.0, 0.5, 1.5, 2.0, 3.0),
                   bias_update_rate=1e-3 if router == "token_choice" else 0.0)
  cfg.time_embedding = True
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  if router == "token_choice":  # a trained-looking bias, so the selection really depends on it
    bias = model.stacks[-1].blocks.ffn.selection_bias
    bias[...] = jnp.asarray(np.random.default_rng(0).normal(size=bias.shape) * 0.2, jnp.float32)
  flat = tensor_names.flatten(_pure(model), cfg)
  assert "time_in" in flat and ("layers.1.ffn.selection_bias" in flat) == (router == "token_choice")
  safetensors_io.write(flat, tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
  batch, t_B = _batch(cfg.vocab_size), jnp.array([0.2, 0.9])
  expected = np.asarray(nnx.jit(lambda m, x, s, p, t: m(x, segment_ids_BxL=s, positions_BxL=p, t_B=t)[0])(
      model, *batch, t_B))
  np.testing.assert_allclose(numpy_forward.forward(str(tmp_path), *batch, t_B), expected, rtol=1e-4, atol=1e-5)
  exported = forward.export_forward(cfg, directory.param_specs_of(flat), platforms=("cpu",))
  np.testing.assert_allclose(np.asarray(exported.call(flat, *batch, t_B)), expected, rtol=1e-5, atol=1e-6)


def test_the_artifact_lowers_for_cpu_gpu_and_tpu_from_a_cpu_host():
  for moe in ({"router": "token_choice"}, {"router": "expert_choice"}):
    cfg = _model_cfg(scan=False, **moe)
    specs = directory.param_specs_of(tensor_names.flatten(_pure(Transformer(cfg, rngs=nnx.Rngs(0))), cfg))
    exported = forward.export_forward(cfg, specs)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert str(exported.in_avals[-1].shape) == "(b, l)" and exported.out_avals[0].shape[2] == cfg.vocab_size


@pytest.mark.parametrize("call, message", [
    (lambda: directory.parse_list("--formats", "orbax,onnx", directory.FORMATS),
     "--formats='orbax,onnx'; allowed values: one or more of orbax, safetensors, stablehlo, comma-separated"),
    (lambda: directory.parse_list("--formats", "", directory.FORMATS), "--formats=''; allowed values"),
    (lambda: directory.check_dtype("float16"), "--dtype='float16'; allowed values: bfloat16, float32"),
    (lambda: directory.parse_list("--platforms", "cpu,metal", forward.PLATFORMS), "--platforms='cpu,metal'"),
    (lambda: safetensors_io.write({}, "/nonexistent", max_shard_bytes=0), "--max_shard_bytes=0"),
])
def test_bad_arguments_are_one_line_naming_the_flag(call, message):
  with pytest.raises(ExportInputError) as err:
    call()
  assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_export_and_load_refuse_missing_or_wrong_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="--workdir=.*no config.json there; allowed values"):
    directory.export_run(tmp_path / "no_run", tmp_path / "out")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x").write_text("")
  with pytest.raises(ExportInputError, match="--out=.*busy: exists and is not an empty directory"):
    directory.export_run(tmp_path / "no_run", tmp_path / "busy")
  with pytest.raises(FileNotFoundError, match="--model=.*written by sdlm-export"):
    directory.read_config(tmp_path / "nothing")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {}}))
  with pytest.raises(ExportInputError, match="not an sdlm_jax export .*use --workdir"):
    directory.read_config(tmp_path / "run")
