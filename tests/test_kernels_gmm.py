"""The grouped-matmul kernels against float64 NumPy and autodiff of the XLA reference.

The TPU kernels run in TPU interpret mode, the GPU (Triton) kernels in Pallas interpret mode.
Interpret mode fills every output buffer with NaN before the kernel runs, so a row a kernel
forgot to write cannot pass (nor can any NaN: `_rel` rejects non-finite outputs). Shapes
cover one to 256 groups, empty groups, rows past the last group, m not a multiple of the row
tile, and k, n from 128 to 2048; bf16 and f32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels.gmm import gpu as gmm_gpu
from pallas_kernels.gmm import plan, tiling
from pallas_kernels.gmm import tpu as gmm_tpu

KERNELS = ("interpret", "interpret_gpu")
CASES = [  # m, k, n, groups, rows past the last group, tiling (None: the modelled default)
    (300, 128, 128, 1, 0, None),
    (300, 256, 384, 5, 23, (128, 128, 128)),
    (257, 2048, 128, 16, 0, None),
    (200, 128, 2048, 64, 7, None),
    (520, 384, 256, 256, 9, None),
    (40, 640, 128, 3, 0, None),
]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _sizes(rng, m, g, slack):
  """Random group sizes summing to m - slack, with a run of empty groups when g > 2."""
  cuts = np.sort(rng.integers(0, m - slack + 1, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [m - slack]]))
  if g > 2:
    first = rng.integers(0, g - 1)
    sizes[first + 1] += sizes[first]
    sizes[first] = 0
  assert sizes.sum() == m - slack and (sizes >= 0).all()
  return sizes.astype(np.int32)


def _np_gmm(lhs, rhs, sizes, first=0):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  ends = np.cumsum(sizes)
  for g in range(first, first + rhs.shape[0]):
    out[ends[g] - sizes[g]:ends[g]] = lhs[ends[g] - sizes[g]:ends[g]] @ rhs[g - first]
  return out


def _np_tgmm(lhs, grad, sizes, first, num):
  lhs, grad = np.asarray(lhs, np.float64), np.asarray(grad, np.float64)
  ends = np.cumsum(sizes)
  return np.stack([lhs[ends[g] - sizes[g]:ends[g]].T @ grad[ends[g] - sizes[g]:ends[g]]
                   for g in range(first, first + num)])


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.all(np.isfinite(got)), "NaN/Inf in kernel output (unwritten rows are NaN in interpret mode)"
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _inputs(seed, m, k, n, g, slack, dtype):
  rng = np.random.default_rng(seed)
  sizes = _sizes(rng, m, g, slack)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
  return sizes, lhs, rhs, rng


# Every case on the TPU kernel in both dtypes; the GPU kernel's bf16 interpretation is slow
# on CPU (emulated bf16 dots inside a dynamic loop), so it gets a subset.
FORWARD = ([("interpret", dt, c) for c in CASES for dt in (jnp.float32, jnp.bfloat16)]
           + [("interpret_gpu", jnp.float32, c) for c in CASES]
           + [("interpret_gpu", jnp.bfloat16, c) for c in (CASES[1], CASES[5])])
GRADIENTS = [("interpret", jnp.float32, CASES[1]), ("interpret", jnp.bfloat16, CASES[1]),
             ("interpret", jnp.float32, CASES[3]),
             pytest.param("interpret", jnp.float32, CASES[4], marks=pytest.mark.slow),  # 256 groups: ~800 steps
             ("interpret_gpu", jnp.float32, CASES[1]), ("interpret_gpu", jnp.bfloat16, CASES[5]),
             ("interpret_gpu", jnp.float32, CASES[4])]


def _ids(params):
  values = [p.values if hasattr(p, "values") else p for p in params]
  return [f"{b}-{jnp.dtype(dt).name}-m{c[0]}k{c[1]}n{c[2]}g{c[3]}" for b, dt, c in values]


@pytest.mark.parametrize("backend,dtype,case", FORWARD, ids=_ids(FORWARD))
def test_gmm_forward_matches_float64(backend, dtype, case):
  m, k, n, g, slack, tile = case
  sizes, lhs, rhs, _ = _inputs(m * g + k, m, k, n, g, slack, dtype)
  out = pk.gmm(lhs, rhs, jnp.asarray(sizes), tiling=tile, backend=backend)
  assert out.shape == (m, n) and out.dtype == dtype
  assert _rel(out, _np_gmm(lhs, rhs, sizes)) <= TOL[dtype]
  assert np.all(np.asarray(out)[m - slack:] == 0)
  if dtype == jnp.bfloat16 and backend == "interpret":  # bf16 operands, f32 output: only accumulation rounds
    out32 = pk.gmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32, tiling=tile, backend=backend)
    assert out32.dtype == jnp.float32 and _rel(out32, _np_gmm(lhs, rhs, sizes)) <= 1e-5


@pytest.mark.parametrize("backend,dtype,case", GRADIENTS, ids=_ids(GRADIENTS))
def test_gmm_gradients_match_autodiff_of_reference(backend, dtype, case):
  m, k, n, g, slack, tile = case
  sizes, lhs, rhs, rng = _inputs(7 + g, m, k, n, g, slack, dtype)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  sizes = jnp.asarray(sizes)

  def loss(a, w):
    return jnp.sum(pk.gmm(a, w, sizes, preferred_element_type=jnp.float32, tiling=tile, backend=backend) * cot)

  def ref_loss(a, w):  # autodiff of lax.ragged_dot on the same values in float32
    return jnp.sum(jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32) * cot)

  got = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
  want = jax.grad(ref_loss, argnums=(0, 1))(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  for d_got, d_want in zip(got, want):
    assert d_got.dtype == dtype
    assert _rel(d_got, d_want) <= TOL[dtype]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("m,k,n,g,slack,tile", [CASES[1], CASES[4]])
def test_tgmm_matches_float64_with_offset_and_empty_groups(backend, m, k, n, g, slack, tile):
  sizes, lhs, _, rng = _inputs(11, m, k, n, g, slack, jnp.float32)
  grad = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  first, num = g // 3, g - g // 3 - (g > 2)
  out = pk.tgmm(lhs, grad, jnp.asarray(sizes), group_offset=first, num_groups=num, tiling=tile, backend=backend)
  assert out.shape == (num, k, n)
  assert _rel(out, _np_tgmm(lhs, grad, sizes, first, num)) <= 1e-5
  assert np.all(np.asarray(out)[sizes[first:first + num] == 0] == 0)


@pytest.mark.parametrize("backend", KERNELS + ("xla",))
def test_group_offset_computes_only_the_local_groups_and_their_gradients(backend):
  m, k, n, g, first, local = 300, 256, 128, 8, 3, 3
  sizes, lhs, rhs, rng = _inputs(3, m, k, n, g, 17, jnp.float32)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  rhs_local = rhs[first:first + local]
  out = pk.gmm(lhs, rhs_local, jnp.asarray(sizes), group_offset=first, tiling=(128, 128, 128), backend=backend)
  assert _rel(out, _np_gmm(lhs, rhs_local, sizes, first)) <= 1e-5

  def loss(a, w):
    return jnp.sum(pk.gmm(a, w, jnp.asarray(sizes), group_offset=first, tiling=(128, 128, 128), backend=backend) * cot)

  def ref_loss(a, w):  # the full problem with the other groups' weights held at zero
    return jnp.sum(jax.lax.ragged_dot(a, w, jnp.asarray(sizes)) * cot)

  rhs_masked = jnp.zeros_like(rhs).at[first:first + local].set(rhs_local)
  d_lhs, d_rhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs_local)
  w_lhs, w_rhs = jax.grad(ref_loss, argnums=(0, 1))(lhs, rhs_masked)
  assert _rel(d_lhs, w_lhs) <= 1e-5
  assert _rel(d_rhs, w_rhs[first:first + local]) <= 1e-5


@pytest.mark.parametrize("backend", KERNELS)
def test_rows_outside_the_groups_never_leak_even_when_nan(backend):
  """Rows past the groups may hold garbage (an uninitialised dispatch buffer): they must
  neither reach the output nor the weight gradient."""
  m, k, n, g, slack = 200, 128, 128, 4, 37
  sizes, lhs, rhs, rng = _inputs(5, m, k, n, g, slack, jnp.float32)
  lhs_nan = lhs.at[m - slack:].set(jnp.nan)
  out = pk.gmm(lhs_nan, rhs, jnp.asarray(sizes), tiling=(128, 128, 128), backend=backend)
  assert _rel(out, _np_gmm(lhs, rhs, sizes)) <= 1e-5
  grad = jnp.asarray(rng.normal(size=(m, n)), jnp.float32).at[m - slack:].set(jnp.inf)
  d_rhs = pk.tgmm(lhs_nan, grad, jnp.asarray(sizes), tiling=(128, 128, 128), backend=backend)
  assert _rel(d_rhs, _np_tgmm(lhs, grad, sizes, 0, g)) <= 1e-5


def test_tpu_kernels_are_race_free_on_two_simulated_cores():
  """The "parallel" grid axes split over a megacore's two TensorCores, in random order: the
  interpreter's race detector must find no conflicting accesses, and the result must hold."""
  # The interpreter's race-detection state (no public accessor in this jax version).
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # pylint: disable=C0415
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=3)
  m, k, n, g = 260, 256, 256, 6
  sizes, lhs, rhs, rng = _inputs(9, m, k, n, g, 5, jnp.float32)
  grad = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  out = gmm_tpu.gmm(lhs, rhs, jnp.asarray(sizes), tiling=(128, 128, 128), interpret=params)
  assert not tpu_interpret.races.races_found
  d_rhs = gmm_tpu.tgmm(lhs, grad, jnp.asarray(sizes), num_groups=g, tiling=(128, 128, 128), interpret=params)
  assert not tpu_interpret.races.races_found
  assert _rel(out, _np_gmm(lhs, rhs, sizes)) <= 1e-5
  assert _rel(d_rhs, _np_tgmm(lhs, grad, sizes, 0, g)) <= 1e-5


def test_visit_plan_covers_every_tile_in_row_order():
  rng = np.random.default_rng(0)
  for _ in range(6):
    m, g, tm = int(rng.integers(1, 900)), int(rng.integers(1, 40)), int(rng.choice([8, 128, 256]))
    sizes = _sizes(rng, m, g, int(rng.integers(0, m)))
    first = int(rng.integers(0, g))
    local = int(rng.integers(1, g - first + 1))
    starts, ends = plan.local_bounds(jnp.asarray(sizes), first, local)
    for zero_tiles, empty in ((True, False), (False, True)):
      group, tile, count = map(np.asarray, plan.visits(starts, ends, m, tm, zero_tiles=zero_tiles, empty_groups=empty))
      count = int(count[0])
      real_g, real_t = group[:count], tile[:count]
      assert np.all(np.diff(real_t) >= 0)  # row-tile order: revisits are consecutive
      assert np.all(group[count:] == group[count - 1]) and np.all(tile[count:] == tile[count - 1])
      s, e = np.asarray(starts), np.asarray(ends)
      for gl in range(local):  # each non-empty group visits exactly the tiles its rows span
        want = set(range(s[gl] // tm, (e[gl] - 1) // tm + 1)) if e[gl] > s[gl] else set()
        got = set(real_t[real_g == gl].tolist())
        assert got == want or (empty and e[gl] == s[gl] and len(got) == 1)
      if zero_tiles:
        assert set(real_t.tolist()) == set(range(-(-m // tm)))


def test_modelled_tiling_fits_vmem_and_divides_the_problem():
  for chip in ("v5e", "v5p", "v6e"):
    with pk.compile_for("tpu", chip):
      for kind in ("gmm", "tgmm"):
        for m, k, n, g in ((16384, 2048, 1024, 64), (16384, 1024, 2048, 64), (100, 128, 384, 3),
                           (8192, 4096, 1536, 256)):
          p = tiling.choose(kind, m, k, n, g, 2, 2)
          assert k % p.tk == 0 and n % p.tn == 0 and p.tm % 16 == 0
          assert p.vmem_bytes <= tiling.VMEM_BUDGET < tiling.VMEM_LIMIT


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("force_ragged", [False, True])
def test_xla_reference_equals_ragged_dot_values_and_gradients(dtype, force_ragged, monkeypatch):
  """backend "xla" on CPU computes from row tiles (ragged_dot is G-times dense there); it must
  equal lax.ragged_dot, gradients included; force_ragged checks the GPU/TPU formulation."""
  from pallas_kernels import reference  # pylint: disable=import-outside-toplevel
  if force_ragged:
    monkeypatch.setattr(reference, "CPU_GATHER_BYTES", 0)
  m, k, n, g, first, local = 333, 128, 256, 9, 2, 4
  sizes, lhs, rhs, rng = _inputs(13, m, k, n, g, 21, dtype)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  sizes = jnp.asarray(sizes)
  loss = lambda a, w: jnp.sum(pk.gmm(a, w, sizes, preferred_element_type=jnp.float32, backend="xla") * cot)
  ref = lambda a, w: jnp.sum(jax.lax.ragged_dot(a, w, sizes, preferred_element_type=jnp.float32) * cot)
  (v, grads), (v_ref, grads_ref) = (jax.value_and_grad(f, argnums=(0, 1))(lhs, rhs) for f in (loss, ref))
  assert abs(float(v) - float(v_ref)) <= 1e-5 * abs(float(v_ref)) + 1e-3
  for got, want in zip(grads, grads_ref):
    assert got.dtype == want.dtype and _rel(got, want) <= TOL[dtype]
  out = pk.gmm(lhs, rhs[first:first + local], sizes, group_offset=first, backend="xla")
  want = _np_gmm(lhs, rhs[first:first + local], np.asarray(sizes), first)
  assert out.dtype == dtype and _rel(out, want) <= TOL[dtype]
  grad = jnp.asarray(rng.normal(size=(m, n)), dtype)
  out = pk.tgmm(lhs, grad, sizes, group_offset=first, num_groups=local, preferred_element_type=jnp.float32,
                backend="xla")
  assert _rel(out, _np_tgmm(lhs, grad, np.asarray(sizes), first, local)) <= 1e-5


def test_backend_errors_are_explicit():
  x, w, sizes = jnp.ones((8, 128)), jnp.ones((1, 128, 128)), jnp.array([8])
  with pytest.raises(NotImplementedError, match="needs a TPU or GPU"):
    pk.gmm(x, w, sizes, backend="pallas")
  with pytest.raises(ValueError, match="allowed values"):
    pk.gmm(x, w, sizes, backend="cuda")
  assert pk.resolve_backend("auto") == "xla"  # CPU
  with pk.compile_for("tpu"):
    assert pk.resolve_backend("auto") == "pallas_tpu"
  with pk.compile_for("gpu"):  # lax.ragged_dot until the Triton kernel is measured faster
    assert pk.resolve_backend("auto") == "xla" and pk.resolve_backend("pallas") == "pallas_gpu"


def test_gpu_kernels_lower_to_triton():
  """Without a GPU the Triton kernels cannot run, but lowering them for CUDA runs the whole
  Pallas-to-Triton translation, so an op Triton lowering lacks fails here."""
  m, k, n, g = 1000, 256, 384, 8
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((g,), jnp.int32), jax.ShapeDtypeStruct((m, n), jnp.bfloat16))

  def fwd_bwd(lhs, rhs, sizes, cot):
    out = gmm_gpu.gmm(lhs, rhs, sizes)
    d_lhs = gmm_gpu.gmm(cot, rhs, sizes, transpose_rhs=True)
    d_rhs = gmm_gpu.tgmm(lhs, cot, sizes, num_groups=g)
    return out, d_lhs, d_rhs

  text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.slow
def test_token_choice_moe_layer_is_the_same_through_the_interpreted_kernel():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sdlm_jax.config_files import repo_module  # pylint: disable=import-outside-toplevel
  demo = repo_module("demo")
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
