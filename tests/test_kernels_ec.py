"""Expert-choice routing, dispatch and combine against NumPy loops, values and gradients.

These ops are XLA (top-k, gather, scatter-add) on every platform; the tests pin their semantics:
top-k per expert with ties to the lower token index, exact gathers, and a weighted scatter-add
where several experts picking one token add up.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk


def _routing(seed, groups=3, tokens=40, experts=6, capacity=7, ties=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(groups, tokens, experts)).astype(np.float32)
  if ties:  # few distinct values: most comparisons are ties
    logits = np.round(logits * 2) / 2
  return rng, jnp.asarray(logits), capacity


@pytest.mark.parametrize("ties", [False, True])
def test_expert_choice_is_top_k_per_expert_with_ties_to_the_lower_token(ties):
  _, logits, capacity = _routing(0, ties=ties)
  token_idx, scores = pk.expert_choice(logits, capacity)
  assert token_idx.dtype == jnp.int32 and token_idx.shape == (3, 6, capacity)
  want_scores, want_idx = jax.lax.top_k(jnp.swapaxes(logits, 1, 2), capacity)
  np.testing.assert_array_equal(token_idx, want_idx)
  np.testing.assert_array_equal(scores, want_scores)
  per_expert = np.swapaxes(np.asarray(logits), 1, 2)  # [G, E, N]
  order = np.argsort(-per_expert, axis=-1, kind="stable")[..., :capacity]  # stable: lower index first
  np.testing.assert_array_equal(token_idx, order)


@pytest.mark.parametrize("d", [16, 256])  # 256: rows move as [2, 128] lane tiles
def test_ec_dispatch_gathers_and_its_gradient_scatters(d):
  rng, logits, capacity = _routing(1)
  token_idx, _ = pk.expert_choice(logits, capacity)
  x = jnp.asarray(rng.normal(size=(3, 40, d)), jnp.float32)
  out = pk.ec_dispatch(x, token_idx)
  idx = np.asarray(token_idx)
  want = np.stack([np.asarray(x)[g][idx[g]] for g in range(3)])
  np.testing.assert_array_equal(out, want)
  cot = rng.normal(size=out.shape).astype(np.float32)
  d_x = jax.grad(lambda x_: jnp.sum(pk.ec_dispatch(x_, token_idx) * cot))(x)
  want_dx = np.zeros(x.shape, np.float64)
  for g in range(3):
    np.add.at(want_dx[g], idx[g].reshape(-1), cot[g].reshape(-1, d))
  np.testing.assert_allclose(d_x, want_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol,d", [(jnp.float32, 1e-6, 16), (jnp.bfloat16, 1e-2, 16), (jnp.float32, 1e-6, 256)])
def test_ec_combine_is_a_weighted_scatter_add_with_gradients(dtype, tol, d):
  rng, logits, capacity = _routing(2)
  token_idx, _ = pk.expert_choice(logits, capacity)
  idx = np.asarray(token_idx)
  y = jnp.asarray(rng.normal(size=(3, 6, capacity, d)), dtype)
  w = jnp.asarray(rng.uniform(size=(3, 6, capacity)), dtype)
  out = pk.ec_combine(y, token_idx, w, 40)
  assert out.shape == (3, 40, d) and out.dtype == dtype
  y64, w64 = np.asarray(y, np.float64), np.asarray(w, np.float64)
  want = np.zeros((3, 40, d))
  for g in range(3):
    np.add.at(want[g], idx[g].reshape(-1), (y64[g] * w64[g][..., None]).reshape(-1, d))
  assert np.linalg.norm(np.asarray(out, np.float64) - want) <= tol * np.linalg.norm(want)
  unpicked = np.setdiff1d(np.arange(40), idx[0].reshape(-1))
  assert np.all(np.asarray(out)[0, unpicked] == 0)
  cot = rng.normal(size=(3, 40, d))
  d_y, d_w = jax.grad(lambda a, b: jnp.sum(pk.ec_combine(a, token_idx, b, 40).astype(jnp.float32) * cot),
                      argnums=(0, 1))(y, w)
  picked_cot = np.stack([cot[g][idx[g]] for g in range(3)])  # [G, E, C, D]
  want_dy, want_dw = picked_cot * w64[..., None], np.sum(picked_cot * y64, -1)
  assert np.linalg.norm(np.asarray(d_y, np.float64) - want_dy) <= tol * 2 * np.linalg.norm(want_dy)
  assert np.linalg.norm(np.asarray(d_w, np.float64) - want_dw) <= tol * 2 * np.linalg.norm(want_dw)


def test_ec_combine_without_weights_sums_and_its_gradient_gathers():
  rng, logits, capacity = _routing(4)
  token_idx, _ = pk.expert_choice(logits, capacity)
  idx = np.asarray(token_idx)
  y = jnp.asarray(rng.normal(size=(3, 6, capacity, 128)), jnp.float32)
  cot = rng.normal(size=(3, 40, 128)).astype(np.float32)
  out, vjp = jax.vjp(lambda a: pk.ec_combine(a, token_idx, None, 40), y)
  want = np.zeros((3, 40, 128))
  for g in range(3):
    np.add.at(want[g], idx[g].reshape(-1), np.asarray(y, np.float64)[g].reshape(-1, 128))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(vjp(cot)[0], np.stack([cot[g][idx[g]] for g in range(3)]))


def test_expert_choice_ops_are_xla_on_every_platform_and_say_so():
  _, logits, capacity = _routing(3)
  with pk.compile_for("tpu"):  # "auto" is XLA on TPU too
    token_idx, _ = pk.expert_choice(logits, capacity, backend="auto")
  for backend in ("pallas", "interpret", "interpret_gpu"):
    with pytest.raises(NotImplementedError, match="does not exist"):
      pk.expert_choice(logits, capacity, backend=backend)
    with pytest.raises(NotImplementedError, match="does not exist"):
      pk.ec_dispatch(jnp.ones((3, 40, 8)), token_idx, backend=backend)
    with pytest.raises(NotImplementedError, match="does not exist"):
      pk.ec_combine(jnp.ones((3, 6, capacity, 8)), token_idx, jnp.ones((3, 6, capacity)), 40, backend=backend)
  with pytest.raises(ValueError, match="allowed values"):
    pk.ec_dispatch(jnp.ones((3, 40, 8)), token_idx, backend="cuda")


def test_rows_move_as_lane_tiles_when_lowered_for_tpu_only():
  """The [N, d/128, 128] view helps the TPU gather and costs the CPU: the lowering platform
  picks it (so an AOT compile for TPU from a CPU host still gets the tiles)."""
  x = jnp.zeros((2, 64, 256))
  idx = jnp.zeros((2, 4, 8), jnp.int32)
  traced = jax.jit(lambda x, i: pk.ec_dispatch(x, i)).trace(x, idx)
  slices = {p: re.findall(r"slice_sizes = array<i64: ([\d, ]+)>", traced.lower(lowering_platforms=(p,)).as_text())
            for p in ("tpu", "cpu")}
  assert slices == {"tpu": ["1, 1, 2, 128"], "cpu": ["1, 1, 256"]}
