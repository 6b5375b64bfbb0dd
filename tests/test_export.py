"""Export end to end: smoke runs -> sdlm-export (orbax, safetensors, jax.export; f32 and bf16)
-> load_pretrained, the NumPy reference and the deserialised artifact all give the run's
logits; sdlm-generate / sdlm-eval --model print what --workdir prints; --step; one-line errors.

Runs: expert choice (unrolled, as the demo), token choice (scanned, a dense first layer so the
two stacks share global layer indices, routed scaling, trained on a 2-device fsdp mesh and
exported on one device), dense (untied head) and the AR baseline (scanned, causal).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sdlm_jax import load_pretrained
from sdlm_jax.export import directory, forward, safetensors_io
from sdlm_jax.train import restore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "ec": ("ec,smoke", [], 1),
    "tc": ("tc,smoke", ["--config.model.scan_layers=True", "--config.model.moe.first_k_dense=1",
                        "--config.model.moe.routed_scaling_factor=1.5", "--config.mesh.data=1",
                        "--config.mesh.fsdp=2"], 2),
    "dense": ("dense,smoke", ["--config.model.tie_embeddings=False"], 1),
    "ar": ("ar,smoke", ["--config.model.scan_layers=True"], 1),
}


def _cli(module, *args):
  return [sys.executable, "-m", f"sdlm_jax.cli.{module}", *args]


def _run(cmd, devices=1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> run directory of a finished smoke run (trained on first use)."""
  root = tmp_path_factory.mktemp("runs")
  data_dir = str(root / "data_cache")
  done = {}

  def get(name):
    if name not in done:
      variant, overrides, devices = RUNS[name]
      workdir = str(root / name)
      proc = _run(_cli("train", f"--config={REPO}/configs/demo.py:{variant}", f"--workdir={workdir}",
                       f"--config.data.data_dir={data_dir}", *overrides), devices)
      assert proc.returncode == 0, proc.stderr[-3000:]
      done[name] = workdir
    return done[name]

  return get


def _batch(vocab, batch=3, length=32, seed=0):
  """Packed documents with restarting positions, a padded tail, one whole-row document."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, vocab, (batch, length)).astype(np.int32)
  seg = np.ones((batch, length), np.int32)
  pos = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  seg[0, 10:], pos[0, 10:] = 2, np.arange(length - 10)
  seg[0, 25:] = 0
  seg[1, 20:] = 0
  return tokens, seg, pos


_forward = nnx.jit(lambda model, t, s, p: model(t, segment_ids_BxL=s, positions_BxL=p)[0])


def _logits(model, batch):
  return np.asarray(_forward(model, *batch))


def _rounded_to_bf16(model):
  """The model with every param rounded to bfloat16 (kept in its own dtype)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params)
  return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.multidevice) if RUNS[n][2] > 1 else n
                                  for n in RUNS])
def test_every_format_reloads_to_the_runs_logits(runs, name, tmp_path):
  workdir = runs(name)
  cfg, _, run_model, step = restore.load_trained_model(workdir, mesh=restore.single_device_mesh())
  batch = _batch(cfg.model.vocab_size)
  expected = _logits(run_model, batch)
  other = _batch(cfg.model.vocab_size, batch=2, length=13, seed=1)

  for dtype in ("float32", "bfloat16"):
    out = tmp_path / dtype
    shard = 60_000 if name == "dense" else safetensors_io.DEFAULT_MAX_SHARD_BYTES
    config = directory.export_run(workdir, out, dtype=dtype, max_shard_bytes=shard, platforms="cpu")
    assert config["export"]["step"] == step == 6 and config["model"]["param_dtype"] == dtype
    assert config["tokenizer"]["mask_id"] == 4 and config["data"] == cfg.data.to_dict()
    assert sorted(os.listdir(out)) == sorted(["config.json", "tokenizer.model", "params", "forward.jax_export"]
                                             + config["export"]["files"]["safetensors"])
    if name == "dense":  # sharded: shards plus the index
      assert safetensors_io.INDEX_FILE in os.listdir(out) and len(config["export"]["files"]["safetensors"]) > 2
    reference = run_model if dtype == "float32" else _rounded_to_bf16(run_model)
    want = _logits(reference, batch)
    if dtype == "bfloat16":  # within bf16 rounding of the trained params
      scale = np.abs(expected).max()
      assert np.abs(want - expected).max() < 0.05 * scale

    model, tokenizer, loaded_cfg = load_pretrained(str(out))  # orbax params/
    assert tokenizer.mask_id == 4 and loaded_cfg.export.step == step
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(_logits(model, batch), want)

    only_st = tmp_path / f"{dtype}_safetensors_only"
    shutil.copytree(out, only_st, ignore=shutil.ignore_patterns("params", "forward.jax_export"))
    model_st, _, _ = load_pretrained(str(only_st))
    np.testing.assert_array_equal(_logits(model_st, batch), want)

    np.testing.assert_allclose(numpy_forward.forward(str(only_st), *batch), want, rtol=1e-4, atol=1e-5)

    exported = forward.load(out / directory.FORWARD_FILE)
    flat = safetensors_io.read(out)
    checkpointer = ocp.StandardCheckpointer()  # params/ needs neither the model nor this library
    raw = checkpointer.restore((out / directory.PARAMS_DIR).resolve())
    checkpointer.close()
    np.testing.assert_array_equal(np.asarray(raw["embed"]), flat["embed"])
    np.testing.assert_allclose(np.asarray(exported.call(flat, *batch)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(exported.call(flat, *other)), _logits(reference, other),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ec_export(runs, tmp_path_factory):
  """The EC run and its float32 export, written through the sdlm-export command line."""
  workdir = runs("ec")
  out = str(tmp_path_factory.mktemp("exports") / "ec")
  proc = _run(_cli("export", f"--workdir={workdir}", f"--out={out}", "--dtype=float32",
                   "--formats=orbax,safetensors"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step 6 of {workdir}" in proc.stdout
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "params", "tokenizer.model"]
  return workdir, out


def test_generate_from_an_export_prints_what_the_run_prints(ec_export):
  workdir, out = ec_export
  args = ["--prompt=KING.", "--prompt=To be, or not", "--seed=3"]  # the smoke config samples (temperature 1)
  from_run = _run(_cli("generate", f"--workdir={workdir}", *args))
  from_export = _run(_cli("generate", f"--model={out}", *args))
  assert from_run.returncode == 0, from_run.stderr[-3000:]
  assert from_export.returncode == 0, from_export.stderr[-3000:]
  assert from_export.stdout == from_run.stdout and from_run.stdout.startswith("# checkpoint step 6\n")
  older = _run(_cli("generate", f"--workdir={workdir}", "--step=3", *args))
  assert older.returncode == 0, older.stderr[-3000:]
  assert older.stdout.startswith("# checkpoint step 3\n")


def test_eval_from_an_export_gives_the_runs_bound(ec_export):
  workdir, out = ec_export
  from_run = _run(_cli("evaluate", f"--workdir={workdir}"))
  from_export = _run(_cli("evaluate", f"--model={out}"))
  assert from_run.returncode == 0, from_run.stderr[-3000:]
  assert from_export.returncode == 0, from_export.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as f:
    run_result = json.load(f)
  with open(os.path.join(out, "eval.json")) as f:
    export_result = json.load(f)
  assert export_result == run_result and np.isfinite(run_result["val/ppl_bound"])
  at_3 = _run(_cli("evaluate", f"--workdir={workdir}", "--step=3"))
  assert at_3.returncode == 0, at_3.stderr[-3000:]
  assert '"step": 3' in at_3.stdout


def test_bad_input_is_one_line_naming_the_flag(ec_export, tmp_path):
  workdir, out = ec_export
  cases = [
      (_cli("export", f"--workdir={workdir}", f"--out={tmp_path}/a", "--formats=orbax,onnx"),
       "sdlm-export: error: --formats='orbax,onnx'; allowed values: one or more of orbax, safetensors, stablehlo"),
      (_cli("export", f"--workdir={workdir}", f"--out={tmp_path}/b", "--dtype=int8"),
       "sdlm-export: error: --dtype='int8'; allowed values: bfloat16, float32"),
      (_cli("export", f"--workdir={tmp_path}/missing", f"--out={tmp_path}/c"),
       f"sdlm-export: error: --workdir={tmp_path}/missing: no config.json there; allowed values"),
      (_cli("export", f"--workdir={workdir}", f"--out={tmp_path}/d", "--step=5"),
       "sdlm-export: error: --step=5: no checkpoint of that step in"),
      (_cli("export", f"--workdir={workdir}", f"--out={out}"),
       f"sdlm-export: error: --out={out}: exists and is not an empty directory"),
      (_cli("generate", f"--workdir={workdir}", f"--model={out}"),
       "sdlm-generate: error: give exactly one of --workdir"),
      (_cli("generate", f"--model={out}", "--step=3"), "sdlm-generate: error: --step=3 goes with --workdir"),
      (_cli("evaluate", f"--model={tmp_path}/none"), f"sdlm-eval: error: --model={tmp_path}/none: no config.json"),
      (_cli("evaluate", f"--workdir={workdir}", "--step=4"), "sdlm-eval: error: --step=4: no checkpoint"),
  ]
  for cmd, start in cases:
    proc = _run(cmd)
    assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(start), (cmd, proc.stderr[-2000:])
  assert "allowed values: 3, 6" in _run(_cli("export", f"--workdir={workdir}", f"--out={tmp_path}/e",
                                             "--step=5")).stderr
