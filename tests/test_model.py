"""Transformer: masks, GQA, packing, shapes, gradients, aux contract, logical axes, meshes."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.config_files import repo_module
from pallas_kernels import target
from sdlm_jax.model.attention import Attention, resolve_implementation
from sdlm_jax.model.layers import apply_rope
from sdlm_jax.model.moe import MoE
from sdlm_jax.model.transformer import Transformer
from sdlm_jax.parallel.mesh import make_mesh, sharding_context
from sdlm_jax.parallel.rules import get_rules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_forward  # noqa: E402  pylint: disable=wrong-import-position

demo = repo_module("demo")

ROUTER_KEYS = {"frac_tokens_zero_experts", "experts_per_token_mean", "experts_per_token_min",
               "experts_per_token_max", "experts_per_token_std", "expert_load", "expert_load_per_layer",
               "load_balance_loss", "z_loss"}


def _model_cfg(variant="ec,smoke", **overrides):
  cfg = demo.get_config(variant).model
  cfg.dtype = "float32"
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


# Jitted calls: one compile per module structure instead of one per op (much faster on CPU).
_attend = nnx.jit(lambda attn, x, seg, pos: attn(x, seg, pos))
_forward = nnx.jit(lambda model, tokens, seg=None, pos=None: model(tokens, segment_ids_BxL=seg, positions_BxL=pos))


def _x(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rope_rotates_like_the_float64_formula_in_the_compute_dtype(dtype, tolerance):
  """Packed positions (restarting at a document boundary), 2 heads of 8: float64 NumPy's
  rotation, in float32 to float32 rounding and in bfloat16 (the dtype it returns and computes
  in) to bfloat16's."""
  x = _x(0, (2, 12, 2, 8))
  positions = jnp.asarray([list(range(12)), list(range(5)) + list(range(7))], jnp.int32) * 97
  got = apply_rope(x.astype(dtype), positions, 10_000.0)
  assert got.dtype == dtype
  for row in range(2):
    want = numpy_forward.rope(np.asarray(x[row].astype(dtype), np.float64), np.asarray(positions[row]), 10_000.0)
    np.testing.assert_allclose(np.asarray(got[row], np.float64), want, rtol=tolerance, atol=tolerance)


def test_attention_isolates_segments_and_tolerates_padding():
  cfg = _model_cfg()
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  x = np.asarray(_x(0, (2, 10, cfg.d_model)))
  seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [0] * 10])  # second row: all padding
  pos = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0], [0] * 10])
  out = np.asarray(_attend(attn, jnp.asarray(x), seg, pos))
  x2 = x.copy()
  x2[0, 4:] = np.asarray(_x(1, (6, cfg.d_model)))  # change segment 2 and the padding
  out2 = np.asarray(_attend(attn, jnp.asarray(x2), seg, pos))
  np.testing.assert_allclose(out[0, :4], out2[0, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[0, 4:7], out2[0, 4:7])
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("segmented", [False, True])
def test_causal_flag_blocks_the_future(segmented):
  causal = Attention(_model_cfg(causal=True), rngs=nnx.Rngs(1))
  bidir = Attention(_model_cfg(causal=False), rngs=nnx.Rngs(1))
  x = np.asarray(_x(1, (1, 8, causal.wq.shape[0])))
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]]) if segmented else None
  pos = jnp.arange(8)[None]
  x2 = x.copy()
  x2[0, 5:] += 1.0
  a, b = _attend(causal, jnp.asarray(x), seg, pos), _attend(causal, jnp.asarray(x2), seg, pos)
  np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[0, 5:7], b[0, 5:7])
  c, d = _attend(bidir, jnp.asarray(x), seg, pos), _attend(bidir, jnp.asarray(x2), seg, pos)
  assert not np.allclose(c[0, 3:5], d[0, 3:5])  # bidirectional: the past sees the future
  assert np.all(np.isfinite(np.asarray(a)))


def test_grouped_query_attention_equals_mha_with_repeated_kv():
  gqa = Attention(_model_cfg(num_heads=4, num_kv_heads=2), rngs=nnx.Rngs(2))
  mha = Attention(_model_cfg(num_heads=4, num_kv_heads=4), rngs=nnx.Rngs(3))
  mha.wq[...], mha.wo[...] = gqa.wq[...], gqa.wo[...]
  mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)  # query heads 2g and 2g+1 share kv head g
  mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
  x = _x(2, (2, 6, gqa.wq.shape[0]))
  seg, pos = jnp.asarray([[1, 1, 1, 2, 2, 0]] * 2), jnp.broadcast_to(jnp.arange(6), (2, 6))
  np.testing.assert_allclose(_attend(gqa, x, seg, pos), _attend(mha, x, seg, pos), rtol=1e-5, atol=1e-6)


def test_splash_attention_is_refused_off_tpu():
  attn = Attention(_model_cfg(attention="splash"), rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="model.attention='splash' is a TPU kernel"):
    attn(_x(0, (1, 4, attn.wq.shape[0])), None, jnp.arange(4)[None])


def test_packed_document_equals_the_document_alone():
  """Segments plus restarting positions: a packed document's logits are those of it alone."""
  model = Transformer(_model_cfg("dense,smoke"), rngs=nnx.Rngs(4))
  doc_a, doc_b = [7, 8, 9, 10, 11], [12, 13, 14]
  packed = jnp.asarray([doc_a + doc_b])
  seg, pos = jnp.asarray([[1] * 5 + [2] * 3]), jnp.asarray([list(range(5)) + list(range(3))])
  logits, _ = _forward(model, packed, seg, pos)
  alone, _ = _forward(model, jnp.asarray([doc_b + [0] * 5]), jnp.asarray([[1] * 3 + [0] * 5]))
  np.testing.assert_allclose(logits[0, 5:], alone[0, :3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["ec,smoke", "tc,smoke", "dense,smoke"])
def test_model_shapes_dtypes_aux_and_finite_gradients(variant):
  cfg = _model_cfg(variant, dtype="bfloat16")
  cfg.moe.load_balance_weight, cfg.moe.z_loss_weight = 0.01, 0.001
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(3).integers(5, cfg.vocab_size, (2, 16)), jnp.int32)
  seg = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def loss_and_grads(p):
    def loss(p):
      logits, aux = nnx.merge(graphdef, p)(tokens, segment_ids_BxL=seg)
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"], (logits, aux)
    return jax.grad(loss, has_aux=True)(p)

  grads, (logits, aux) = loss_and_grads(params)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["aux_loss"].shape == () and aux["aux_loss"].dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  router = aux["router"]
  if variant == "dense,smoke":
    assert router == {} and float(aux["aux_loss"]) == 0.0
    return
  assert set(router) == ROUTER_KEYS
  assert router["expert_load"].shape == (cfg.moe.num_experts,)
  num_moe = cfg.num_layers - cfg.moe.first_k_dense
  assert router["expert_load_per_layer"].shape == (num_moe, cfg.moe.num_experts)
  np.testing.assert_allclose(router["expert_load_per_layer"].mean(0), router["expert_load"], rtol=1e-6)
  assert all(v.dtype == jnp.float32 for v in router.values())
  expected = num_moe * (0.01 * router["load_balance_loss"] + 0.001 * router["z_loss"])
  assert float(aux["aux_loss"]) == pytest.approx(float(expected), rel=1e-5)
  if variant == "ec,smoke":  # each of 4 experts takes 16*2/4 = 8 real tokens per row: 64 picks, 26 real tokens
    assert float(router["experts_per_token_mean"]) == pytest.approx(64 / 26, rel=1e-6)


def test_first_k_dense_layers_and_all_padding_rows():
  cfg = _model_cfg("ec,smoke", num_layers=3)
  cfg.moe.first_k_dense = 2
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  # Two scanned stacks: 2 dense layers (params stacked on a leading axis of 2), then 1 MoE layer.
  kinds = [(isinstance(s.blocks.ffn, MoE), s.blocks.attn.wq[...].shape[0]) for s in model.stacks]
  assert kinds == [(False, 2), (True, 1)]
  seg = jnp.asarray([[1] * 8, [0] * 8])  # a row of padding only
  logits, aux = _forward(model, jnp.full((2, 8), 5, jnp.int32), seg)
  assert np.all(np.isfinite(np.asarray(logits))) and np.isfinite(float(aux["aux_loss"]))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in aux["router"].values())


def test_every_param_carries_logical_axis_names_and_builds_under_a_mesh():
  cfg = _model_cfg("ec,smoke")
  cfg.moe.ec_group = "batch"
  mesh = make_mesh(demo.get_config("ec,smoke").mesh)
  with sharding_context(mesh):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.ones((2, 8), jnp.int32))
  assert logits.shape == (2, 8, cfg.vocab_size) and set(aux["router"]) == ROUTER_KEYS
  assert all(isinstance(p[...].sharding, jax.sharding.NamedSharding) for p in jax.tree.leaves(
      nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)))
  allowed = {name for name, _ in get_rules()} | {None}
  params = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    assert set(names) <= allowed and any(names), (path, names)


def _unrolled_and_scanned(variant):
  """The same weights as an unrolled model and as a scanned one (stacked per layer)."""
  cfg = _model_cfg(variant, num_layers=3, scan_layers=False)
  cfg.moe.first_k_dense = 1
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  scanned_cfg = cfg.copy_and_resolve_references()
  scanned_cfg.scan_layers = True
  scanned = Transformer(scanned_cfg, rngs=nnx.Rngs(1))
  flat = dict(nnx.to_flat_state(nnx.state(unrolled, nnx.Param)))
  stacked = {}
  for path, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
    if path[0] == "stacks":  # ("stacks", s, "blocks", ...) <- ("stacks", s, "blocks", i, ...)
      layers = var[...].shape[0]
      stacked[path] = jnp.stack([flat[path[:3] + (i,) + path[3:]][...] for i in range(layers)])
    else:
      stacked[path] = flat[path][...]
  nnx.update(scanned, nnx.from_flat_state(stacked))
  return unrolled, scanned


def test_scanned_and_unrolled_models_initialise_the_same_weights():
  """scan_layers changes the program, not the model: layer i of an unrolled stack holds slice i
  of the scanned stack's params (so switching it keeps a config's training run the same)."""
  cfg = _model_cfg("ec,smoke", num_layers=3, scan_layers=True)
  cfg.moe.first_k_dense = 1
  scanned = dict(nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  cfg.scan_layers = False
  unrolled = dict(nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  compared = set()
  for path, var in scanned.items():
    layers = range(var[...].shape[0]) if path[0] == "stacks" else [None]
    for i in layers:  # ("stacks", s, "blocks", ...) -> ("stacks", s, "blocks", i, ...)
      key = path if i is None else path[:3] + (i,) + path[3:]
      np.testing.assert_array_equal(var[...] if i is None else var[...][i], unrolled[key][...])
      compared.add(key)
  assert compared == set(unrolled)


@pytest.mark.parametrize("variant", ["ec,smoke", "tc,smoke"])
def test_scanned_layers_equal_unrolled_layers(variant):
  unrolled, scanned = _unrolled_and_scanned(variant)
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 500, (2, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 16, [1] * 10 + [0] * 6])
  (a, aux_a), (b, aux_b) = _forward(unrolled, tokens, seg), _forward(scanned, tokens, seg)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  for key in aux_a["router"]:
    np.testing.assert_allclose(np.asarray(aux_b["router"][key]), np.asarray(aux_a["router"][key]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux_b["aux_loss"]), float(aux_a["aux_loss"]), rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "minimal", "save_dot_except_mlp", "save_dots",
                                   "save_dots_no_batch"])
def test_remat_policies_change_memory_not_gradients(remat):
  cfg = _model_cfg("ec,smoke", remat="none")
  state = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 500, (2, 16)), jnp.int32)

  def grads(policy):
    remat_cfg = cfg.copy_and_resolve_references()
    remat_cfg.remat = policy
    remat_graphdef, _ = nnx.split(Transformer(remat_cfg, rngs=nnx.Rngs(0)))
    loss = lambda s: jnp.sum(nnx.merge(remat_graphdef, s)(tokens)[0] ** 2)
    is_rematted = "remat" in str(jax.make_jaxpr(jax.grad(loss))(state))
    return jax.jit(jax.grad(loss))(state), is_rematted

  (reference, plain), (rematted, wrapped) = grads("none"), grads(remat)
  assert not plain and wrapped
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(rematted)):  # recomputation reorders float sums
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("platform, dtype, expected", [
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "xla"),
    ("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"), ("cpu", jnp.bfloat16, "xla")])
def test_auto_attention_follows_the_compile_target_and_the_compute_dtype(platform, dtype, expected):
  """`auto` is chosen for the platform being compiled for (an AOT compile for TPU from a CPU
  host chooses as a TPU would: splash), and never cuDNN for a float32 model, which cuDNN rejects.
  `splash` exists only on TPU; its interpret mode runs anywhere."""
  with target.compile_for(platform):
    assert resolve_implementation("auto", dtype) == expected
    assert resolve_implementation("xla", dtype) == "xla"
    assert resolve_implementation("splash_interpret", dtype) == "splash_interpret"
    if platform == "tpu":
      assert resolve_implementation("splash", dtype) == "splash"
    else:
      with pytest.raises(NotImplementedError, match="splash"):
        resolve_implementation("splash", dtype)


def test_time_embedding_feeds_t_to_every_position_and_is_required():
  model = Transformer(_model_cfg("dense,smoke", time_embedding=True), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 512, (2, 8)), jnp.int32)
  run = nnx.jit(lambda m, x, t: m(x, t_B=t)[0])
  a, b = run(model, tokens, jnp.array([0.1, 0.9])), run(model, tokens, jnp.array([0.1, 0.2]))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)        # row 0 has the same t
  assert not np.allclose(a[1], b[1], atol=1e-6)            # row 1's t changed every position's logits
  with pytest.raises(ValueError, match="time_embedding=True needs the diffusion time"):
    model(tokens)
  plain = Transformer(_model_cfg("dense,smoke"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="takes none"):
    plain(tokens, t_B=jnp.zeros(2))
  assert plain.time_in is None and model.time_in.shape == (64, 64)
