"""The expert-choice expert FFN kernel (pallas_kernels.ec_ffn) against its XLA path.

Interpret mode (the TPU kernel's semantics on CPU) vs backend "xla" (dispatch + three einsums,
what the model runs by default): values and gradients in x, gates and the three weights, in
float32, with capacities that are not a multiple of 8, repeated token indices and tokens no
expert picks. The Mosaic compile for v5e / v5p / v6e at the seed size is `tpu_aot`.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
from pallas_kernels import aot, target
from pallas_kernels.ec_ffn import tpu as ec_ffn_tpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pallas_calls import pallas_call_params  # noqa: E402  pylint: disable=wrong-import-position


def _problem(seed, groups, tokens, experts, capacity, d, f, *, ties=False):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(groups, tokens, d)), jnp.float32)
  if ties:  # each expert picks some tokens twice, and tokens >= tokens // 2 are picked by nobody
    idx = rng.integers(0, max(tokens // 2, 1), size=(groups, experts, capacity))
  else:
    idx = np.stack([np.stack([rng.permutation(tokens)[:capacity] for _ in range(experts)]) for _ in range(groups)])
  gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(groups, experts, capacity)), jnp.float32)
  weights = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32)
             for s in ((experts, d, f), (experts, d, f), (experts, f, d))]
  cot = jnp.asarray(rng.normal(size=(groups, experts, capacity, d)), jnp.float32)
  return x, jnp.asarray(idx, jnp.int32), gates, weights, cot


def _numpy(x, idx, gates, wg, wu, wd):
  x, gates, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, gates, wg, wu, wd))
  idx = np.asarray(idx)
  out = np.zeros(idx.shape + (x.shape[-1],))
  for g in range(idx.shape[0]):
    for e in range(idx.shape[1]):
      xs = x[g][idx[g, e]]
      a = xs @ wg[e]
      out[g, e] = (a / (1 + np.exp(-a)) * (xs @ wu[e]) * gates[g, e][:, None]) @ wd[e]
  return out


SHAPES = [  # (G, N, E, C, D, F, tiles)
    (1, 16, 2, 8, 128, 128, None),
    (2, 24, 3, 13, 128, 256, (8, 128)),      # C not a multiple of 8, two C tiles, two F tiles
    (1, 40, 4, 20, 256, 384, (8, 128)),      # three C tiles (prefetch across two buffers), three F tiles
    (2, 12, 2, 5, 64, 96, None),             # d, f padded to 128 in the wrapper
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "G{}N{}E{}C{}D{}F{}".format(*s[:6]))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_interpret_kernel_matches_xla_values_and_gradients(shape, ties):
  groups, tokens, experts, capacity, d, f, tiles = shape
  x, idx, gates, weights, cot = _problem(sum(shape[:6]) + ties, groups, tokens, experts, capacity, d, f, ties=ties)
  if ties:
    picked = np.zeros(tokens, bool)
    picked[np.asarray(idx).reshape(-1)] = True
    assert not picked.all()  # some token is chosen by no expert
  run = lambda backend: lambda *a: pk.ec_ffn(a[0], idx, *a[1:], tiles=tiles, backend=backend)
  args = (x, gates, *weights)
  got, vjp_kernel = jax.vjp(run("interpret"), *args)
  want, vjp_xla = jax.vjp(run("xla"), *args)
  assert got.shape == (groups, experts, capacity, d) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, _numpy(x, idx, gates, *weights), rtol=1e-4, atol=1e-4)
  names = ("x", "gates", "w_gate", "w_up", "w_down")
  for name, a, b in zip(names, vjp_kernel(cot), vjp_xla(cot)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
  if ties:  # the unpicked tokens get no gradient
    d_x = np.asarray(vjp_kernel(cot)[0])
    assert np.all(d_x[:, tokens // 2:] == 0)


def test_gradients_under_jit_through_the_custom_vjp():
  x, idx, gates, weights, cot = _problem(7, 2, 24, 3, 13, 128, 256)
  loss = lambda backend: lambda *a: jnp.sum(pk.ec_ffn(a[0], idx, *a[1:], backend=backend) * cot)
  got = jax.jit(jax.grad(loss("interpret"), argnums=(0, 1, 2, 3, 4)))(x, gates, *weights)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2, 3, 4))(x, gates, *weights)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backends_say_what_exists():
  x, idx, gates, weights, _ = _problem(0, 1, 16, 2, 8, 128, 128)
  assert pk.resolve_ec_ffn_backend("auto") == "xla"
  with pk.compile_for("tpu"):  # "auto" stays XLA on TPU until the kernel is measured there
    assert pk.resolve_ec_ffn_backend("auto") == "xla"
    assert pk.resolve_ec_ffn_backend("pallas") == "pallas_tpu"
  with pytest.raises(NotImplementedError, match="interpret"):
    pk.ec_ffn(x, idx, gates, *weights, backend="pallas")  # CPU
  with pytest.raises(NotImplementedError):
    pk.ec_ffn(x, idx, gates, *weights, backend="interpret_gpu")
  with pytest.raises(ValueError, match="allowed values"):
    pk.ec_ffn(x, idx, gates, *weights, backend="cuda")


def test_tile_model_fits_the_vmem_budget_at_the_seed_size():
  for chip in ("v5e", "v5p", "v6e"):
    p = ec_ffn_tpu.plan(1, 64, 2048, 2048, 640, 2, 2, chip=target.CHIPS[chip])
    assert p.vmem_bytes <= ec_ffn_tpu.VMEM_BUDGET
    assert p.tf == 640  # each expert's weights stay resident across its C tiles: fetched once
    assert p.hbm_bytes == 64 * 3 * 2048 * 640 * 2 + 64 * 2048 * (2048 * 4 + 8)
    with_residuals = ec_ffn_tpu.plan(1, 64, 2048, 2048, 640, 2, 2, chip=target.CHIPS[chip], residuals=True)
    assert with_residuals.vmem_bytes <= ec_ffn_tpu.VMEM_BUDGET and with_residuals.tf == 640


def test_moe_layer_with_the_kernel_matches_the_xla_path():
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  cfg = repo_module("demo").get_config("ec,smoke").model
  cfg.dtype = "float32"
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, cfg.d_model)), jnp.float32)
  mask = jnp.ones((2, 16), bool).at[1, 12:].set(False)
  results = {}
  for backend in ("xla", "interpret"):
    cfg.moe.backend = backend
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(p, a):
      y, _, _ = nnx.merge(graphdef, p)(a, mask)
      return jnp.sum(y ** 2), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    results[backend] = (y, grads)
  (y_x, g_x), (y_k, g_k) = results["xla"], results["interpret"]
  np.testing.assert_allclose(y_k, y_x, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _moe_block_kernel_calls(remat):
  """How many ec_ffn kernels the gradient of a rematerialised smoke-size MoE block runs, its
  expert FFN being the Mosaic kernel (traced for a v5p: the TPU interpret mode's callbacks
  cannot run under remat; that remat leaves gradients unchanged is tests/test_model.py's)."""
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  from sdlm_jax.model.transformer import Block, run_block  # pylint: disable=import-outside-toplevel
  cfg = repo_module("demo").get_config("ec,smoke").model
  cfg.moe.backend = "pallas"
  graphdef, state = nnx.split(Block(cfg, is_moe=True, rngs=nnx.Rngs(0)))
  run = run_block(remat)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  mask = jnp.ones((2, 16), bool)
  x = jnp.ones((2, 16, cfg.d_model))
  grad = jax.grad(lambda s: jnp.sum(run(graphdef, s, x, None, pos, mask)[0]))
  with target.compile_for("tpu", "v5p"):
    return sum("ec_ffn" in params for params in pallas_call_params(jax.make_jaxpr(grad)(state).jaxpr))


@pytest.mark.parametrize("remat, kernel_runs", [("none", 1), ("minimal_with_context_and_rope", 1), ("minimal", 1),
                                                ("save_dot_except_mlp", 2), ("full", 2)])
def test_minimal_policies_keep_the_kernel_residuals_so_the_backward_does_not_rerun_it(remat, kernel_runs):
  """The kernel's gathered rows and gate/up projections carry checkpoint names
  (pk.EC_FFN_RESIDUAL_NAMES) that every `minimal` policy keeps: the forward kernel runs once
  per step, as without remat; policies that recompute the FFN rerun it."""
  assert _moe_block_kernel_calls(remat) == kernel_runs


SEED = dict(groups=1, tokens=16384, experts=64, capacity=2048, d=2048, f=640)  # 8 x 2048 tokens per chip, top_k 8


def _seed_fn(backward):
  if not backward:
    return lambda *a: pk.ec_ffn(*a, backend="pallas")

  def fwd_bwd(x, idx, gates, wg, wu, wd):
    out, vjp = jax.vjp(lambda *a: pk.ec_ffn(a[0], idx, *a[1:], backend="pallas"), x, gates, wg, wu, wd)
    return out, vjp(out)
  return fwd_bwd


@pytest.mark.tpu_aot
@pytest.mark.parametrize("topology,backward", [
    ("v5e:2x2", False), ("v5p:2x2x1", False), ("v6e:2x2", False),
    # the residual-writing variant, 20-45 s a chip: on v5p, the chip with the least VMEM (v5e picks
    # the same tiles and uses the same VMEM; v5e and v6e have twice v5p's)
    pytest.param("v5p:2x2x1", True, marks=pytest.mark.slow)], ids=["v5e-fwd", "v5p-fwd", "v6e-fwd", "v5p-fwd_bwd"])
def test_mosaic_compiles_at_the_seed_size_and_declares_its_flops(topology, backward):
  """One Mosaic kernel (forward; with the backward, the variant that also writes the residuals),
  its VMEM (libtpu's report) within the granted scoped VMEM and the chip, and (forward) XLA's
  flop count of the compiled program = the declared 6*C*D*F*E."""
  pytest.importorskip("jax.experimental.topologies")
  s, bf16 = SEED, jnp.bfloat16
  shapes = [((s["groups"], s["tokens"], s["d"]), bf16), ((s["groups"], s["experts"], s["capacity"]), jnp.int32),
            ((s["groups"], s["experts"], s["capacity"]), bf16), ((s["experts"], s["d"], s["f"]), bf16),
            ((s["experts"], s["d"], s["f"]), bf16), ((s["experts"], s["f"], s["d"]), bf16)]
  compiled = aot.compile_on(topology, _seed_fn(backward), *shapes)
  assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 1
  chip = target.CHIPS[aot.chip_of(topology)]
  (used, granted, end), = aot.kernel_vmem(compiled).values()
  print(f"{topology} {'fwd+bwd' if backward else 'fwd'}: ec_ffn VMEM {used / 2**20:.1f} MiB of "
        f"{granted / 2**20:.0f} MiB granted")
  assert 0 < used <= granted <= ec_ffn_tpu.VMEM_LIMIT and end <= chip.vmem_bytes
  flops = 6 * s["capacity"] * s["d"] * s["f"] * s["experts"] * s["groups"]
  if not backward:
    assert aot.cost_analysis(compiled)["flops"] == pytest.approx(flops, rel=1e-3)
  assert aot.hbm_bytes(compiled) < chip.hbm_bytes


def _seed_layer_cfg(backend):
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  cfg = repo_module("demo").get_config("ec").model
  cfg.d_model, cfg.dtype = 2048, "bfloat16"
  cfg.moe.num_experts, cfg.moe.expert_mlp_dim, cfg.moe.top_k, cfg.moe.num_shared_experts = 64, 640, 8, 0
  cfg.moe.ec_group, cfg.moe.backend = "batch", backend
  return cfg


def test_the_kernel_refuses_expert_parallelism_in_the_layer():
  from jax.sharding import AbstractMesh, AxisType  # pylint: disable=import-outside-toplevel
  from sdlm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  from sdlm_jax.parallel.rules import MESH_AXES, get_rules  # pylint: disable=import-outside-toplevel
  cfg = _seed_layer_cfg("interpret")
  cfg.d_model, cfg.moe.num_experts, cfg.moe.expert_mlp_dim = 128, 4, 128
  layer = MoE(cfg, rngs=nnx.Rngs(0))
  mesh = AbstractMesh((1, 1, 2, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
  with jax.sharding.use_abstract_mesh(mesh), nnx.logical_axis_rules(get_rules()):
    with pytest.raises(ConfigError, match="expert parallelism"):
      jax.eval_shape(lambda x: layer(x, jnp.ones(x.shape[:2], bool)), jax.ShapeDtypeStruct((2, 16, 128), jnp.float32))


@pytest.mark.tpu_aot
@pytest.mark.slow
def test_moe_layer_with_the_kernel_compiles_under_a_batch_mesh_on_v5p():
  """The EC layer, forward + backward, on 4 v5p chips (data 4, batch-level routing, 2 x 2048
  tokens per chip): one kernel per chip inside the shard_map, no all-gather of the tokens."""
  pytest.importorskip("jax.experimental.topologies")
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  from sdlm_jax.parallel.mesh import make_mesh, sharding_context  # pylint: disable=import-outside-toplevel
  cfg = _seed_layer_cfg("pallas")
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, model=1, dcn_data=-1, dcn_fsdp=1,
                                                  dcn_expert=1, dcn_model=1, rules="default")), devices)
  with sharding_context(mesh), target.compile_for("tpu", "v5p"):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))), nnx.Param)

    def loss(p, x):
      y, _, _ = nnx.merge(graphdef, p)(x, jnp.ones(x.shape[:2], bool))
      return jnp.sum(jnp.square(y.astype(jnp.float32)))
    x = jax.ShapeDtypeStruct((8, 2048, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 1
  (used, granted, _), = aot.kernel_vmem(compiled).values()
  assert 0 < used <= granted
  assert "all-gather" not in text  # the weights are replicated here (fsdp 1) and the tokens stay split
