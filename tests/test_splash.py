"""Splash attention (jax's Pallas TPU kernel, sdlm_jax/model/splash.py) in TPU interpret mode
against float64 NumPy attention (values) and XLA attention (gradients): packed segments,
padding rows, lengths that are not a multiple of the kernel's 128-row tiles, causal and
bidirectional, GQA and MHA. Then its declared cost against a hand count, the model through
the dispatch point, the named remat policies' saved residuals and the forward kernel's
reruns."""

import collections
import contextlib
import io
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdlm_jax.config_files import repo_module
from sdlm_jax.model import splash
from sdlm_jax.model.attention import attend, attention_mask
from sdlm_jax.model.transformer import Block, Transformer, run_block

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pallas_calls import pallas_call_params  # noqa: E402  pylint: disable=wrong-import-position

demo = repo_module("demo")


def _numpy_attention(q, k, v, seg, causal):
  """float64 softmax(q k^T / sqrt(K)) v, query and key in the same segment (and k <= q)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  heads, groups = q.shape[2], k.shape[2]
  k, v = np.repeat(k, heads // groups, axis=2), np.repeat(v, heads // groups, axis=2)
  scores = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(q.shape[-1])
  seg = np.asarray(seg)
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  if causal:
    mask = mask & np.tril(np.ones((q.shape[1],) * 2, bool))
  scores = np.where(mask, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhlm,bmhk->blhk", p / p.sum(-1, keepdims=True), v)


def _inputs(length, heads, groups, head_dim=64, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  # Row 0: two documents then padding (segment 0); row 1: one document then padding.
  cut = [length * 2 // 5, length * 4 // 5]
  seg = np.zeros((batch, length), np.int32)
  seg[0, :cut[0]], seg[0, cut[0]:cut[1]] = 1, 2
  seg[1, :cut[1] + 7] = 1
  return (normal(batch, length, heads, head_dim), normal(batch, length, groups, head_dim),
          normal(batch, length, groups, head_dim), jnp.asarray(seg))


@pytest.mark.parametrize("causal, length, heads, groups", [
    (False, 200, 4, 2),   # bidirectional, GQA, length padded 200 -> 256
    (True, 256, 4, 1),    # causal, MQA (one kv head), two 128-row tiles
    (False, 384, 2, 2),   # MHA kernel, three tiles
])
def test_interpret_matches_attention_values_and_gradients(causal, length, heads, groups):
  q, k, v, seg = _inputs(length, heads, groups)
  got = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, seg, causal=causal, interpret=True))
  np.testing.assert_allclose(got(q, k, v), _numpy_attention(q, k, v, seg, causal), rtol=1e-5, atol=1e-5)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(seg), is_causal=causal)

  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)
  for got_grad, want_grad in zip(grads(got), grads(xla)):
    assert np.all(np.isfinite(got_grad))
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)


def test_no_segment_ids_is_one_document_per_row():
  q, k, v, _ = _inputs(128, 2, 2)
  got = splash.splash_attention(q, k, v, None, causal=False, interpret=True)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, np.ones((2, 128)), False), rtol=1e-5, atol=1e-5)


def test_declared_cost_counts_the_tiles_the_mask_leaves():
  """Hand count at L 1024 (two 512-row tiles), 16 heads of 128, bf16: bidirectional runs all
  4 tile pairs, causal 3 (the upper-right tile is skipped)."""
  spec = splash.Spec(length=1024, q_heads=16, head_dim=128, mqa=False, causal=False, block=512, itemsize=2,
                     interpret=False)
  for causal, pairs in ((False, 4), (True, 3)):
    costs = splash.kernel_costs(spec if not causal else splash.Spec(**{**spec.__dict__, "causal": True}))
    tile = 512 * 512
    assert costs["fwd"].flops == 16 * pairs * tile * (2 * 128 + 2 * 128)          # QK^T, PV
    # the fused backward: QK^T, dO V^T, P^T dO, dS^T Q, dS K
    assert costs["dkv"].flops == 16 * pairs * tile * (5 * 2 * 128)
    assert costs.keys() == {"fwd", "dkv"}
    assert costs["fwd"].transcendentals == costs["dkv"].transcendentals == 16 * pairs * tile
    # q read and o written once, k and v tiles read once per active pair, the f32 logsumexp written
    assert costs["fwd"].bytes_accessed == 16 * (2 * 1024 * 128 * 2 + 2 * pairs * 512 * 128 * 2 + 4 * 1024)
    # k, v read and dk, dv written once; q, dO tiles per active pair; logsumexp and its dO.o
    # term read; a dq partial per (kv tile, q tile), all 4 of them whatever the mask
    assert costs["dkv"].bytes_accessed == 16 * (4 * 1024 * 128 * 2 + 2 * pairs * 512 * 128 * 2 + 2 * 4 * 1024
                                                + 4 * 512 * 128 * 2)
  with pytest.raises(StopIteration):
    splash._block(100)  # the caller pads to a multiple of 128 first


@pytest.mark.slow
def test_model_with_splash_interpret_equals_xla_attention():
  """The whole model through the dispatch point (model.attention), packed rows with padding:
  logits and parameter gradients agree with XLA attention."""
  cfg = demo.get_config("smoke").model
  cfg.dtype = "float32"
  cfg.num_kv_heads = 1  # GQA: 2 query heads share one kv head
  cfg.num_layers = 1
  tokens = jnp.asarray(np.random.default_rng(0).integers(5, 500, (2, 64)), jnp.int32)
  seg = jnp.asarray([[1] * 30 + [2] * 30 + [0] * 4, [1] * 50 + [0] * 14], jnp.int32)

  def run(attention):
    c = cfg.copy_and_resolve_references()
    c.attention = attention
    graphdef, state = nnx.split(Transformer(c, rngs=nnx.Rngs(0)))
    loss = lambda s: jnp.sum(jnp.tanh(nnx.merge(graphdef, s)(tokens, segment_ids_BxL=seg)[0]))
    return jax.jit(jax.value_and_grad(loss))(state)

  (want, want_grads), (got, got_grads) = run("xla"), run("splash_interpret")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):  # float32 sums in another order
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_attend_dispatch_rejects_unknown_names():
  q, k, v, seg = _inputs(128, 2, 2)
  with pytest.raises(ValueError, match="allowed values"):
    attend(q, k, v, seg, causal=False, implementation="flash")


def _block_loss(remat, attention="auto"):
  """sum(one rematerialised smoke-size block's output) as a function of (params, x), with its
  params and a [2, 16] input."""
  cfg = demo.get_config("smoke").model
  cfg.dtype, cfg.attention = "float32", attention
  graphdef, state = nnx.split(Block(cfg, is_moe=False, rngs=nnx.Rngs(0)))
  run = run_block(remat)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  return lambda s, x: jnp.sum(run(graphdef, s, x, None, pos, None)[0]), state, jnp.ones((2, 16, cfg.d_model))


def _saved_names(remat):
  """The checkpoint names among the residuals one rematerialised block keeps for backward,
  and the residual shapes."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(*_block_loss(remat))
  lines = out.getvalue().splitlines()
  return {line.split("named '")[1].split("'")[0] for line in lines if "named '" in line}, lines


@pytest.mark.parametrize("remat, names", [
    ("minimal", {"query_proj", "key_proj", "value_proj", "out_proj", "mlpwi_0", "mlpwi_1"}),
    ("minimal_with_context", {"query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi_0", "mlpwi_1"}),
    ("minimal_with_context_and_rope", {"query_proj", "key_proj", "value_proj", "query_rope", "key_rope", "context",
                                       "out_proj", "mlpwi_0", "mlpwi_1"}),
    ("save_dot_except_mlp", {"query_proj", "key_proj", "value_proj", "out_proj"}),
    ("save_qkv_proj", {"query_proj", "key_proj", "value_proj"}),
    ("full", set()),
])
def test_named_remat_policies_save_exactly_their_projections(remat, names):
  """What each policy keeps (mlpwo, the block's last output, is never needed by the backward
  pass, so it is not kept even where the policy allows it); nothing of shape [B, H, L, L]."""
  saved, lines = _saved_names(remat)
  assert saved == names, lines
  assert not any("[2,2,16,16]" in line.replace(" ", "") for line in lines), lines


@pytest.mark.parametrize("remat, forward_runs", [("minimal", 2), ("minimal_with_context", 1),
                                                 ("minimal_with_context_and_rope", 1), ("full", 2), ("none", 1)])
def test_saving_context_spares_the_backward_a_rerun_of_the_forward_kernel(remat, forward_runs):
  """The kernel tags its residuals `context`: a policy that saves it runs the forward kernel
  once per step, as no remat does; the others rerun it in the backward pass."""
  loss, state, x = _block_loss(remat, attention="splash_interpret")
  grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(state, x)
  calls = collections.Counter(re.search(r"splash_m[hq]a_(fwd|dq|dkv)", params).group(1)
                              for params in pallas_call_params(grad_jaxpr.jaxpr))
  assert calls == {"fwd": forward_runs, "dkv": 1}, calls  # the fused backward: no separate dq kernel
