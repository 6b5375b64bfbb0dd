"""The Pallas TPU grouped-matmul kernels, run in TPU interpret mode on CPU, against float64.

Interpret mode fills uninitialised memory with NaN, so a row the kernel forgot to write
cannot pass; ragged, empty and non-tile-multiple groups are all exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

TILING = (128, 128, 128)


def _sizes(rng, m, g, slack):
  """Random group sizes with some zeros, summing to m - slack."""
  cuts = np.sort(rng.integers(0, m - slack + 1, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [m - slack]]))
  if g > 2:
    sizes[rng.integers(0, g)] = 0
    sizes[-1] = m - slack - sizes[:-1].sum()
  return sizes.astype(np.int32)


def _np_gmm(lhs, rhs, sizes, first=0, local=None):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  local = rhs.shape[0] if local is None else local
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  ends = np.cumsum(sizes)
  for gi in range(first, first + local):
    s, e = ends[gi] - sizes[gi], ends[gi]
    out[s:e] = lhs[s:e] @ rhs[gi - first]
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)), "NaN/Inf in kernel output"
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [  # m, k, n, groups, slack rows past the last group
    (300, 128, 128, 1, 0),
    (300, 256, 128, 5, 23),
    (257, 128, 256, 16, 0),
    (200, 128, 128, 64, 7),
]


@pytest.mark.parametrize("m,k,n,g,slack", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gmm_forward_matches_float64(m, k, n, g, slack, dtype, tol):
  rng = np.random.default_rng(m + g)
  sizes = _sizes(rng, m, g, slack)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)), dtype)
  out = pk.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32, tiling=TILING, backend="interpret")
  assert out.shape == (m, n)
  assert _rel(out, _np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)) <= tol
  assert np.all(np.asarray(out)[m - slack:] == 0)


@pytest.mark.parametrize("m,k,n,g,slack", CASES[1:3])
def test_gmm_gradients_match_autodiff_of_reference(m, k, n, g, slack):
  rng = np.random.default_rng(1)
  sizes = jnp.asarray(_sizes(rng, m, g, slack))
  lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  def loss(backend):
    return lambda a, b: jnp.sum(pk.gmm(a, b, sizes, tiling=TILING, backend=backend) * cot)
  d_kernel = jax.grad(loss("interpret"), argnums=(0, 1))(lhs, rhs)
  d_ref = jax.grad(loss("xla"), argnums=(0, 1))(lhs, rhs)
  assert _rel(d_kernel[0], d_ref[0]) <= 1e-5
  assert _rel(d_kernel[1], d_ref[1]) <= 1e-5


@pytest.mark.parametrize("m,k,n,g,slack", CASES)
def test_tgmm_matches_float64_and_zeroes_empty_groups(m, k, n, g, slack):
  rng = np.random.default_rng(2)
  sizes = _sizes(rng, m, g, slack)
  lhs = rng.normal(size=(m, k)).astype(np.float32)
  grad = rng.normal(size=(m, n)).astype(np.float32)
  out = np.asarray(pk.tgmm(jnp.asarray(lhs), jnp.asarray(grad), jnp.asarray(sizes), tiling=TILING, backend="interpret"))
  ends = np.cumsum(sizes)
  ref = np.stack([lhs[e - s:e].astype(np.float64).T @ grad[e - s:e] for s, e in zip(sizes, ends)])
  assert _rel(out, ref) <= 1e-5
  assert np.all(out[sizes == 0] == 0)


def test_group_offset_computes_only_the_local_groups():
  rng = np.random.default_rng(3)
  m, k, n, g = 260, 128, 128, 8
  sizes = _sizes(rng, m, g, 11)
  lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  rhs_local = jnp.asarray(rng.normal(size=(3, k, n)), jnp.float32)  # groups 4, 5, 6
  ref = _np_gmm(lhs, rhs_local, sizes, first=4)
  for backend in ("interpret", "xla"):
    out = pk.gmm(lhs, rhs_local, jnp.asarray(sizes), group_offset=4, tiling=TILING, backend=backend)
    assert _rel(out, ref) <= 1e-5, backend


def test_pallas_backend_on_cpu_is_a_clear_error():
  x = jnp.ones((8, 128))
  with pytest.raises(NotImplementedError, match="TPU kernel only"):
    pk.gmm(x, jnp.ones((1, 128, 128)), jnp.array([8]), backend="pallas")
  with pytest.raises(ValueError, match="allowed values"):
    pk.gmm(x, jnp.ones((1, 128, 128)), jnp.array([8]), backend="cuda")


def test_token_choice_moe_layer_is_the_same_through_the_interpreted_kernel():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from sdlm_jax.model.moe import MoE  # pylint: disable=import-outside-toplevel
  cfg = demo.get_config("tc,smoke").model
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, cfg.d_model)), jnp.float32)
  mask = jnp.ones((2, 32), bool)
  results = {}
  for backend in ("xla", "interpret"):
    cfg.moe.backend = backend
    with nnx.use_eager_sharding(False):
      layer = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)
    loss = jax.jit(jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, mask)[0] ** 2)))
    results[backend] = loss(params)
  (ref, ref_grads), (got, got_grads) = results["xla"], results["interpret"]
  assert abs(float(got) - float(ref)) / abs(float(ref)) < 1e-2  # bf16 compute
  for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads)):
    assert _rel(b, a) < 2e-2
