"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) as Pallas Mosaic TPU kernels.

Both walk the visit list of plan.py (one (group, row tile) pair per visit, in row order,
scalar-prefetched into SMEM together with the groups' row ranges):

  gmm:  out[rows of g] = lhs[rows of g] @ rhs[g]         grid (n/tn, visits, k/tk)
  tgmm: out[g] = lhs[rows of g].T @ grad[rows of g]       grid (k/tk, n/tn, visits)

gmm accumulates over k in a float32 VMEM scratch; at the last k step a visit writes its
group's rows of the output tile, keeping the rows earlier visits of the same tile wrote (the
output block stays resident in VMEM while consecutive visits share its index). Tiles no local
group touches get a visit that writes zeros and fetches nothing new, so every output row is
written in-kernel: rows past sum(group_sizes), and with `first_group` (expert parallelism) the
rows of non-local groups, come out zero, as with `lax.ragged_dot`.

tgmm accumulates all visits of a group into one float32 scratch and writes the group's
[tk, tn] block at its last visit; each empty group gets one visit that writes zeros.

Rows are never padded: the last row tile may run past m; rows outside the visit's group
(including those) are masked with a select, so garbage there can neither leak nor turn into
NaN. k and n are padded to multiples of 128 only when they are not already.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm import plan, tiling as tiling_lib


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_axis(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _interpret(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def _gmm_kernel(meta_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, at, tm, transpose_rhs, precision):
  i, kk = pl.program_id(1), pl.program_id(2)
  g = meta_ref[at.group + i]
  tile = meta_ref[at.tile + i]
  real = i < meta_ref[at.count]

  @pl.when(real & (g >= 0))
  def _():
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    part = jax.lax.dot_general(lhs_ref[...], rhs_ref[0], contract, precision=precision,
                               preferred_element_type=jnp.float32)

    @pl.when(kk == 0)
    def _():
      acc_ref[...] = part

    @pl.when(kk > 0)
    def _():
      acc_ref[...] += part

  @pl.when(real & (kk == pl.num_programs(2) - 1))
  def _():
    gi = jnp.maximum(g, 0)
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (g >= 0) & (rows >= meta_ref[at.start + gi]) & (rows < meta_ref[at.end + gi])
    shared = (i > 0) & (meta_ref[at.tile + jnp.maximum(i - 1, 0)] == tile)

    @pl.when(jnp.logical_not(shared))
    def _():
      out_ref[...] = jnp.where(mine, acc_ref[...], 0.0).astype(out_ref.dtype)

    @pl.when(shared)
    def _():
      out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


@functools.partial(jax.jit, static_argnames=("out_dtype", "transpose_rhs", "tiling", "interpret"))
def gmm(lhs_MxK, rhs, group_sizes_G, first_group=0, *, out_dtype=None, transpose_rhs=False, tiling=None,
        interpret=False):
  """out[m, n] = lhs rows of local group g @ rhs[g - first_group]; other rows zero.

  rhs is [G_local, k, n], or [G_local, n, k] with transpose_rhs (the lhs gradient, without
  materialising a transposed copy of the weights).
  """
  m, k = lhs_MxK.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  k_pad, n_pad = _round_up(k, 128), _round_up(n, 128)
  lhs = _pad_axis(lhs_MxK, 1, k_pad)
  rhs = _pad_axis(_pad_axis(rhs, 2 if not transpose_rhs else 1, n_pad), 1 if not transpose_rhs else 2, k_pad)
  in_bytes = jnp.dtype(lhs.dtype).itemsize
  p = tiling_lib.choose("gmm", m, k_pad, n_pad, num_local, in_bytes, out_dtype.itemsize, tiling)
  tm, tk, tn = p.tm, p.tk, p.tn
  starts, ends = plan.local_bounds(group_sizes_G, first_group, num_local)
  group_V, tile_V, count = plan.visits(starts, ends, m, tm, zero_tiles=True, empty_groups=False)
  meta, at = plan.pack(starts, ends, group_V, tile_V, count)
  k_last = k_pad // tk - 1

  def k_index(i, kk, meta):
    # Zero-tile and padding visits keep one k block: nothing new is fetched for them.
    return jnp.where((i < meta[at.count]) & (meta[at.group + i] >= 0), kk, k_last)

  def lhs_map(j, i, kk, meta):
    return meta[at.tile + i], k_index(i, kk, meta)

  def rhs_map(j, i, kk, meta):
    g, kb = jnp.maximum(meta[at.group + i], 0), k_index(i, kk, meta)
    return (g, j, kb) if transpose_rhs else (g, kb, j)

  rhs_block = (1, tn, tk) if transpose_rhs else (1, tk, tn)
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, at=at, tm=tm, transpose_rhs=transpose_rhs, precision=_precision(lhs.dtype)),
      out_shape=jax.ShapeDtypeStruct((m, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(n_pad // tn, group_V.shape[0], k_pad // tk),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), lambda j, i, kk, meta: (meta[at.tile + i], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=tiling_lib.VMEM_LIMIT),
      cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=p.hbm_bytes),
      interpret=_interpret(interpret),
      name="gmm",
  )(meta, lhs, rhs)
  return out if n_pad == n else out[:, :n]


def _tgmm_kernel(meta_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, at, tm, precision):
  i, last_i = pl.program_id(2), pl.num_programs(2) - 1
  count = meta_ref[at.count]
  g = meta_ref[at.group + i]
  real = i < count
  first = (i == 0) | (meta_ref[at.group + jnp.maximum(i - 1, 0)] != g)
  last = (i + 1 >= count) | (meta_ref[at.group + jnp.minimum(i + 1, last_i)] != g)
  start, end = meta_ref[at.start + g], meta_ref[at.end + g]

  @pl.when(real & first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real & (end > start))
  def _():
    rows = meta_ref[at.tile + i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    mine = (rows >= start) & (rows < end)
    lhs = jnp.where(mine, lhs_ref[...], 0)
    grad = jnp.where(mine, grad_ref[...], 0)
    acc_ref[...] += jax.lax.dot_general(lhs, grad, (((0,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)

  @pl.when(real & last)
  def _():
    out_ref[0] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret"))
def tgmm(lhs_MxK, grad_MxN, group_sizes_G, first_group=0, *, num_groups, out_dtype=None, tiling=None,
         interpret=False):
  """out[g] = lhs[rows of group first_group + g].T @ grad[same rows]: [num_groups, k, n]."""
  m, k = lhs_MxK.shape
  n = grad_MxN.shape[1]
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  if m == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  k_pad, n_pad = _round_up(k, 128), _round_up(n, 128)
  lhs, grad = _pad_axis(lhs_MxK, 1, k_pad), _pad_axis(grad_MxN, 1, n_pad)
  in_bytes = jnp.dtype(lhs.dtype).itemsize
  p = tiling_lib.choose("tgmm", m, k_pad, n_pad, num_groups, in_bytes, out_dtype.itemsize, tiling)
  tm, tk, tn = p.tm, p.tk, p.tn
  starts, ends = plan.local_bounds(group_sizes_G, first_group, num_groups)
  group_V, tile_V, count = plan.visits(starts, ends, m, tm, zero_tiles=False, empty_groups=True)
  meta, at = plan.pack(starts, ends, group_V, tile_V, count)
  tile_of = lambda i, meta: meta[at.tile + i]
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, at=at, tm=tm, precision=_precision(lhs.dtype)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(k_pad // tk, n_pad // tn, group_V.shape[0]),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda kk, j, i, meta: (tile_of(i, meta), kk)),
              pl.BlockSpec((tm, tn), lambda kk, j, i, meta: (tile_of(i, meta), j)),
          ],
          out_specs=pl.BlockSpec((1, tk, tn), lambda kk, j, i, meta: (meta[at.group + i], kk, j)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=tiling_lib.VMEM_LIMIT),
      cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=p.hbm_bytes),
      interpret=_interpret(interpret),
      name="tgmm",
  )(meta, lhs, grad)
  return out if (k_pad, n_pad) == (k, n) else out[:, :k, :n]
