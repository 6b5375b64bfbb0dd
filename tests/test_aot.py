"""sdlm-aot: slice names, the depth extrapolation of the cost model, expert-parallel TPU
programs, and the command line (fits / does not fit), compiled through libtpu on this CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sdlm_jax.config_files import repo_module
from pallas_kernels import aot as kernel_aot
from sdlm_jax import aot
from sdlm_jax.scaling.flops import flops_per_token

demo_config = repo_module("demo").get_config

pytestmark = pytest.mark.tpu_aot
pytest.importorskip("jax.experimental.topologies")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,topology,chips,hosts", [
    ("v5p-128", "v5p:4x4x4", 64, 16), ("v5p-8", "v5p:2x2x1", 4, 1), ("v6e-64", "v6e:8x8", 64, 16),
    ("v6e-8", "v6e:2x4", 8, 1), ("v5litepod-16", "v5e:4x4", 16, 4), ("v4-32", "v4:2x2x4", 16, 4),
    ("v5p:2x2x2", "v5p:2x2x2", 8, 2)])
def test_parse_slice_accelerator_types_and_topologies(name, topology, chips, hosts):
  tpu_slice = aot.parse_slice(name)
  assert (tpu_slice.topology, tpu_slice.chips, tpu_slice.hosts) == (topology, chips, hosts)
  assert aot.parse_slice(name, num_slices=2).hosts == 2 * hosts


@pytest.mark.parametrize("name,message", [("v5p-12", "allowed sizes"), ("v7x-8", "allowed values"),
                                          ("tpu", "allowed values"), ("v5p:2x2y", "allowed values")])
def test_parse_slice_rejects_unknown_names(name, message):
  with pytest.raises(ValueError, match=message):
    aot.parse_slice(name)


def _small(variant: str, **mesh):
  cfg = demo_config(variant)
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = "full"
  cfg.train.batch_size = 32
  cfg.mesh.update(mesh)
  return cfg


def test_depth_extrapolation_recovers_a_cost_linear_in_each_layer_kind(monkeypatch):
  """estimate_cost reads per-kind slopes off small unrolled compiles and extrapolates them.

  The compile is replaced by a cost linear in the layers (fixed part + per dense layer + per
  MoE layer): the estimate for the full depth must be exactly that line's value. (Against a
  real full unrolled compile at the seeds' size the estimate was within 1%; such a compile
  takes ~10 CPU minutes, too long for the suite.)
  """
  def fake_cost(cfg):
    assert not cfg.model.scan_layers
    num_dense = cfg.model.moe.first_k_dense if cfg.model.moe.num_experts else cfg.model.num_layers
    num_moe = cfg.model.num_layers - num_dense
    return {"optimal_seconds": 0.5 + 0.25 * num_dense + 1.5 * num_moe, "flops": 7.0 + 2.0 * num_dense + 3.0 * num_moe}

  monkeypatch.setattr(aot, "compile_train_step", lambda cfg, *args: cfg)
  monkeypatch.setattr(aot, "cost", fake_cost)
  cfg = _small("ec")
  cfg.model.update(num_layers=12)
  cfg.model.moe.first_k_dense = 3
  assert aot.depth_probes(cfg) == [(1, 1), (2, 1), (1, 2)]
  assert aot.estimate_cost(cfg, [], "v5p") == {"optimal_seconds": 0.5 + 0.75 + 13.5, "flops": 7.0 + 6.0 + 27.0,
                                               "layer_seconds": {"dense": 0.25, "moe": 1.5}}
  cfg.model.moe.num_experts = 0  # dense only: probes of 1 and 2 dense layers
  assert aot.depth_probes(cfg) == [(1, 0), (2, 0)]
  assert aot.estimate_cost(cfg, [], "v5p")["flops"] == 7.0 + 2.0 * 12


@pytest.mark.parametrize("router,collective", [("token_choice", "ragged-all-to-all"),
                                               ("expert_choice", "all-to-all")])
def test_expert_parallel_programs_move_tokens_with_all_to_all(router, collective):
  cfg = _small("tc" if router == "token_choice" else "ec", data=1, fsdp=2, expert=4)
  if router == "expert_choice":
    cfg.model.moe.ec_group = "batch"
  cfg.model.num_layers = 2
  report = aot.fit_report(cfg, aot.parse_slice("v5p-16"), estimate=False)
  assert report["fits"]
  assert report["collectives"].get(collective, (0, 0))[0] >= 2, report["collectives"]  # forward and backward


def test_fsdp_weight_gathers_are_all_gathers_not_all_reduces():
  """One layer of the 1.7B seed (FSDP over v5p-128's 64 chips): with the train step's TPU
  compiler options its weight gathers compile to all-gathers. libtpu's default makes each an
  all-reduce of a zero-filled full-size buffer: the program then has no all-gather, and its
  all-reduces move the weights once more than the gradient reduction does (348 MB against 122).
  The gathers are counted once each, though libtpu copies an overlapped one into every fusion of
  its async chain: the layer's bf16 weights twice (forward, and again for the rematerialised
  backward) and the embedding table and output head once (before, 746.6 MB were reported)."""
  cfg = repo_module("openmoe2/dense_1b7").get_config()
  cfg.model.update(num_layers=1, vocab_size=1024)
  cfg.data.seq_len, cfg.train.batch_size = 256, 64
  report = aot.fit_report(cfg, aot.parse_slice("v5p-128"), estimate=False)
  m = cfg.model
  layer_weight_bytes = 2 * (4 * m.d_model * m.num_heads * m.head_dim + 3 * m.d_model * m.mlp_dim)  # bf16
  embedding_and_head_bytes = 2 * 2 * m.vocab_size * m.d_model  # bf16
  assert report["collectives"]["all-gather"][1] == 2 * layer_weight_bytes + embedding_and_head_bytes, report
  assert report["collectives"]["all-reduce"][1] < 2 * layer_weight_bytes, report["collectives"]


@pytest.mark.slow
def test_timing_compiles_count_every_flop_of_windowed_einsums():
  """With FSDP beside expert parallelism libtpu turns the expert matmuls into windowed einsums,
  loops the cost model counts once: for this program (one EC layer of the seed, one sequence
  per v5p-128 chip, mesh.expert=8) libtpu's defaults give 9 while loops and 0.599 of its 0.792
  TFLOPs. The timing compiles (ESTIMATE_OPTIONS) keep the matmuls whole: no loop, every FLOP."""
  cfg = repo_module("openmoe2/ec_8b1b7a").get_config()
  cfg.model.vocab_size = 1024
  cfg.data.seq_len, cfg.train.batch_size = 2048, 64
  cfg.mesh.expert = 8
  cfg = aot._with_depth(cfg, 0, 1)
  tpu_slice = aot.parse_slice("v5p-128")
  devices = aot.slice_devices(tpu_slice)
  analytic = flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len / len(devices)
  compiled = aot.compile_train_step(cfg, devices, tpu_slice.chip, aot.ESTIMATE_OPTIONS)
  assert " while(" not in compiled.as_text()
  assert 1.0 <= float(aot.cost(compiled)["flops"]) / analytic < 1.1


def _sdlm_aot(*args):
  return subprocess.run([sys.executable, "-m", "sdlm_jax.cli.aot", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.parametrize("topology", ["v6e:2x2", "v5e:2x2", "v5p:2x2x1"])
def test_estimate_options_give_attention_a_positive_time_on_every_chip(topology):
  """One sequence of softmax attention: on v5e/v6e libtpu slices the prefetch of its operands
  into VMEM, which its cost model prices at -1 s; ESTIMATE_OPTIONS turns the slicing off."""
  def attention(q, k, v):
    p = jax.nn.softmax(jnp.einsum("blhk,bmhk->bhlm", q, k).astype(jnp.float32), -1).astype(q.dtype)
    return jnp.einsum("bhlm,bmhk->blhk", p, v)

  qkv = [((1, 2048, 16, 128), jnp.bfloat16)] * 3
  compiled = kernel_aot.compile_on(topology, attention, *qkv, compiler_options=aot.ESTIMATE_OPTIONS)
  seconds = kernel_aot.estimated_seconds(compiled)
  flops = 2 * 2 * 16 * 2048 * 2048 * 128
  assert flops / 1e15 < seconds < 0.05  # finite, positive, and not faster than a PFLOP/s


@pytest.mark.slow
def test_cli_reports_a_fitting_config_with_its_estimate():
  proc = _sdlm_aot(f"--config={REPO}/configs/demo.py:ec", "--topology=v5p-8", "--config.train.batch_size=32",
                   "--config.model.dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for text in ("slice v5p-8 (v5p:2x2x1, 4 chips, 1 hosts)", "(fits)", "estimated step", "MFU", "tokens/s/chip",
               "per layer: moe", "collectives:"):
    assert text in proc.stdout, proc.stdout


def test_cli_fails_clearly_when_the_config_does_not_fit():
  # 16M tokens per chip of float32 logits (vocab 2048) need ~128 GiB of a 16 GiB v5e.
  proc = _sdlm_aot(f"--config={REPO}/configs/demo.py:dense", "--topology=v5litepod-4", "--noestimate",
                   "--config.train.batch_size=524288")
  assert proc.returncode == 1
  # libtpu refuses to compile it (or, when it compiles, the report's total exceeds the HBM).
  assert "does not fit on v5e-4" in proc.stderr and "exceeds available HBM" in proc.stderr, proc.stderr[-2000:]


def test_cli_rejects_a_bad_topology_and_an_indivisible_batch():
  proc = _sdlm_aot(f"--config={REPO}/configs/demo.py", "--topology=v5p-12")
  assert proc.returncode == 1 and "allowed sizes" in proc.stderr, proc.stderr[-2000:]
  proc = _sdlm_aot(f"--config={REPO}/configs/demo.py", "--topology=v5p-64", "--config.train.batch_size=20")
  assert proc.returncode == 1 and "batch_size" in proc.stderr, proc.stderr[-2000:]
