"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) as Pallas Triton GPU kernels.

GPU programs run concurrently, so, unlike the TPU kernels, no two programs may write the
same output tile:

  gmm:  one program per (row tile, n tile). It loops over the local groups that overlap its
        rows (a range precomputed per tile), and for each runs the k loop with the rows of
        other groups loaded as zeros, so all groups accumulate into one register tile that
        is stored once (rows past m masked). Tiles no local group touches store zeros.
  tgmm: one program per (group, k tile, n tile). It walks the group's rows in chunks of bm
        (loads masked at the group's end, any alignment), so no work is wasted; an empty
        group stores zeros.

Blocks are (bm, bk, bn) = `tiling` or DEFAULT_TILING / DEFAULT_TGMM_TILING: common Triton
matmul shapes for H100-class GPUs, not yet tuned on one (no GPU was available to measure).
k and n are padded to multiples of bk and bn when needed; rows never are.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm import plan

DEFAULT_TILING = (64, 64, 128)
DEFAULT_TGMM_TILING = (64, 64, 128)
NUM_WARPS = 4
NUM_STAGES = 3


def _pow2_at_most(x: int, cap: int) -> int:
  p = 16
  while p * 2 <= min(x, cap):
    p *= 2
  return p


def _blocks(m, k, n, tiling, default):
  bm, bk, bn = tiling or default
  return _pow2_at_most(max(m, 16), bm), _pow2_at_most(max(k, 16), bk), _pow2_at_most(max(n, 16), bn)


def _pad_axis(x, axis: int, multiple: int):
  size = -(-x.shape[axis] // multiple) * multiple
  if size == x.shape[axis]:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _tile_group_ranges(starts_L, ends_L, m: int, bm: int):
  """For each row tile, the local groups [lo, hi) whose rows may overlap it."""
  tile_starts_T = jnp.arange(0, m, bm, dtype=jnp.int32)
  lo_T = jnp.sum(ends_L[None, :] <= tile_starts_T[:, None], axis=1, dtype=jnp.int32)
  hi_T = jnp.sum(starts_L[None, :] < tile_starts_T[:, None] + bm, axis=1, dtype=jnp.int32)
  return lo_T, hi_T


def _gmm_kernel(start_ref, end_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, m, bm, bk, bn, k_steps,
                transpose_rhs, precision):
  t, j = pl.program_id(0), pl.program_id(1)
  row0 = t * bm
  rows = row0 + jnp.arange(bm)

  def group_body(g, acc):
    start, end = start_ref[g], end_ref[g]
    mine = jnp.broadcast_to(((rows >= start) & (rows < end))[:, None], (bm, bk))

    def k_body(kk, acc):
      lhs = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(kk * bk, bk)], mask=mine, other=0)
      if transpose_rhs:
        rhs = plgpu.load(rhs_ref.at[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)])
        contract = (((1,), (1,)), ((), ()))
      else:
        rhs = plgpu.load(rhs_ref.at[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)])
        contract = (((1,), (0,)), ((), ()))
      return acc + jax.lax.dot_general(lhs, rhs, contract, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, jnp.where(end > start, k_steps, 0), k_body, acc)

  acc = jax.lax.fori_loop(lo_ref[t], hi_ref[t], group_body, jnp.zeros((bm, bn), jnp.float32))
  plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
              mask=jnp.broadcast_to((rows < m)[:, None], (bm, bn)))


@functools.partial(jax.jit, static_argnames=("out_dtype", "transpose_rhs", "tiling", "interpret"))
def gmm(lhs_MxK, rhs, group_sizes_G, first_group=0, *, out_dtype=None, transpose_rhs=False, tiling=None,
        interpret=False):
  """Same contract as tpu.gmm: [m, n], rows of non-local groups and past the groups zero."""
  m, k = lhs_MxK.shape
  num_local = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  bm, bk, bn = _blocks(m, k, n, tiling, DEFAULT_TILING)
  n_axis, k_axis = (1, 2) if transpose_rhs else (2, 1)
  lhs = _pad_axis(lhs_MxK, 1, bk)
  rhs = _pad_axis(_pad_axis(rhs, k_axis, bk), n_axis, bn)
  k_pad, n_pad = lhs.shape[1], rhs.shape[n_axis]
  starts, ends = plan.local_bounds(group_sizes_G, first_group, num_local)
  lo_T, hi_T = _tile_group_ranges(starts, ends, m, bm)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, m=m, bm=bm, bk=bk, bn=bn, k_steps=k_pad // bk, transpose_rhs=transpose_rhs,
                        precision=_precision(lhs.dtype)),
      out_shape=jax.ShapeDtypeStruct((m, n_pad), out_dtype),
      grid=(lo_T.shape[0], n_pad // bn),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=(n_pad // bn) * m * k * itemsize + num_local * k * n * itemsize + m * n * out_dtype.itemsize),
      interpret=interpret,
      name="gmm_gpu",
  )(starts, ends, lo_T, hi_T, lhs, rhs)
  return out if n_pad == n else out[:, :n]


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, bm, bk, bn, precision):
  g, kt, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = start_ref[g], end_ref[g]

  def body(c, acc):
    row0 = start + c * bm
    mine = (row0 + jnp.arange(bm) < end)[:, None]
    lhs = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(kt * bk, bk)], mask=jnp.broadcast_to(mine, (bm, bk)), other=0)
    grad = plgpu.load(grad_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], mask=jnp.broadcast_to(mine, (bm, bn)),
                      other=0)
    return acc + jax.lax.dot_general(lhs, grad, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, (end - start + bm - 1) // bm, body, jnp.zeros((bk, bn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret"))
def tgmm(lhs_MxK, grad_MxN, group_sizes_G, first_group=0, *, num_groups, out_dtype=None, tiling=None,
         interpret=False):
  """Same contract as tpu.tgmm: [num_groups, k, n], empty groups zero."""
  m, k = lhs_MxK.shape
  n = grad_MxN.shape[1]
  out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
  if m == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  bm, bk, bn = _blocks(m, k, n, tiling, DEFAULT_TGMM_TILING)
  lhs, grad = _pad_axis(lhs_MxK, 1, bk), _pad_axis(grad_MxN, 1, bn)
  k_pad, n_pad = lhs.shape[1], grad.shape[1]
  starts, ends = plan.local_bounds(group_sizes_G, first_group, num_groups)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn, precision=_precision(lhs.dtype)),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), out_dtype),
      grid=(num_groups, k_pad // bk, n_pad // bn),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((None, bk, bn), lambda g, kt, j: (g, kt, j)),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * k * n, transcendentals=0,
          bytes_accessed=((n_pad // bn) * m * k + (k_pad // bk) * m * n) * itemsize
          + num_groups * k * n * out_dtype.itemsize),
      interpret=interpret,
      name="tgmm_gpu",
  )(starts, ends, lhs, grad)
  return out if (k_pad, n_pad) == (k, n) else out[:, :k, :n]
