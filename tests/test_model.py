"""Transformer: masks, GQA, shapes, gradients, logical axis names, mesh construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from sdlm_jax.model.attention import Attention
from sdlm_jax.model.transformer import Transformer
from sdlm_jax.parallel.mesh import make_mesh
from sdlm_jax.parallel.rules import get_rules


def _model_cfg(variant="ec,smoke", **overrides):
  cfg = demo.get_config(variant).model
  cfg.dtype = "float32"
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def _build(cls, cfg, seed=0):
  with nnx.use_eager_sharding(False):
    return cls(cfg, rngs=nnx.Rngs(seed))


def test_attention_isolates_segments_and_tolerates_padding():
  cfg = _model_cfg()
  attn = _build(Attention, cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 10, cfg.d_model)).astype(np.float32)
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]])
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0]])
  out = attn(jnp.asarray(x), jnp.asarray(seg), jnp.asarray(pos))
  x2 = x.copy()
  x2[0, 4:] = rng.normal(size=(6, cfg.d_model))  # change segment 2 and the padding
  out2 = attn(jnp.asarray(x2), jnp.asarray(seg), jnp.asarray(pos))
  np.testing.assert_allclose(out[0, :4], out2[0, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[0, 4:7], out2[0, 4:7])
  assert np.all(np.isfinite(np.asarray(out)))


def test_causal_flag_blocks_the_future():
  cfg = _model_cfg(causal=True)
  attn = _build(Attention, cfg)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 8, cfg.d_model)).astype(np.float32)
  seg, pos = jnp.ones((1, 8), jnp.int32), jnp.arange(8)[None]
  x2 = x.copy()
  x2[0, 5:] += 1.0
  a, b = attn(jnp.asarray(x), seg, pos), attn(jnp.asarray(x2), seg, pos)
  np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-6, atol=1e-6)
  bidir = _build(Attention, _model_cfg(causal=False))
  assert not np.allclose(bidir(jnp.asarray(x), seg, pos)[0, :5], bidir(jnp.asarray(x2), seg, pos)[0, :5])


def test_grouped_query_attention_equals_mha_with_repeated_kv():
  gqa_cfg = _model_cfg(num_heads=4, num_kv_heads=2, qk_norm=False)
  mha_cfg = _model_cfg(num_heads=4, num_kv_heads=4, qk_norm=False)
  gqa, mha = _build(Attention, gqa_cfg), _build(Attention, mha_cfg)
  mha.wq[...] = gqa.wq[...]
  mha.wo[...] = gqa.wo[...]
  mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
  mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, gqa_cfg.d_model)).astype(np.float32))
  seg, pos = jnp.ones((2, 6), jnp.int32), jnp.broadcast_to(jnp.arange(6), (2, 6))
  np.testing.assert_allclose(gqa(x, seg, pos), mha(x, seg, pos), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["ec,smoke", "tc,smoke", "dense,smoke"])
def test_model_shapes_dtypes_and_finite_gradients(variant):
  cfg = _model_cfg(variant)
  cfg.dtype = "bfloat16"
  model = _build(Transformer, cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(5, cfg.vocab_size, (2, 16)), jnp.int32)
  seg = jnp.ones((2, 16), jnp.int32).at[1, 10:].set(0)
  logits, aux = model(tokens, segment_ids_BxL=seg)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert (aux["router"] == {}) == (variant == "dense,smoke")

  graphdef, params = nnx.split(model, nnx.Param)
  def loss(p):
    lg, a = nnx.merge(graphdef, p)(tokens, segment_ids_BxL=seg)
    return jnp.mean(jax.nn.logsumexp(lg, -1)) + a["aux_loss"]
  grads = jax.grad(loss)(params)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_every_param_carries_logical_axis_names_and_builds_under_a_mesh():
  cfg = _model_cfg("ec,smoke")
  mesh = make_mesh(demo.get_config("ec,smoke").mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(get_rules()):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, _ = model(jnp.ones((2, 8), jnp.int32))
  assert logits.shape == (2, 8, cfg.vocab_size)
  allowed = {name for name, _ in get_rules()} | {None}
  params = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(params):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, path
    assert set(names) <= allowed, (path, names)
