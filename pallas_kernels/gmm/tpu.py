"""Grouped matmul (gmm) and transposed grouped matmul (tgmm) as Pallas Mosaic TPU kernels.

Rows of `lhs` are sorted by group. The kernels walk a static-length list of *visits*: each
visit is one (group, m-tile) pair, built on device from `group_sizes` (scalar-prefetched
into SMEM). A tile whose rows span two groups is visited once per group, consecutively, and
each visit masks the rows outside its group, so results are exact for any group sizes,
including empty groups and groups that do not start on a tile boundary.

  gmm:  out[rows of g] = lhs[rows of g] @ rhs[g]          grid (n tiles, visits, k tiles)
  tgmm: out[g] = lhs[rows of g].T @ grad[rows of g]        grid (k tiles, n tiles, visits)

gmm accumulates over k in a float32 VMEM scratch and, at the last k step, writes the masked
tile (first visit of an m-tile) or adds to it (later visits: the output block stays resident
in VMEM because consecutive visits share its block index). Rows past sum(group_sizes) are
never visited; the wrapper zeroes them (an elementwise pass over the output) so the result
equals `lax.ragged_dot`. tgmm accumulates every visit of a group into one scratch and writes
the group's [k, n] tile when the next visit belongs to another group; empty groups get one
fully masked visit so their output is written as zeros.

Tiling: (tm, tk, tn), default (512, 512, 512) clipped to the problem: 128-multiples keep the
MXU fed on every TPU generation, and with bf16 operands the double-buffered tiles plus the f32
accumulator take ~5 MiB of VMEM, well inside the scoped default of v5e/v5p/v6e.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

DEFAULT_TILING = (512, 512, 512)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def tile_sizes(m: int, k: int, n: int, tiling=None) -> tuple[int, int, int]:
  """Clips the requested (tm, tk, tn) to the problem, keeping TPU-friendly multiples."""
  tm, tk, tn = tiling or DEFAULT_TILING
  return (min(tm, _round_up(m, 8)), min(tk, _round_up(k, 128)), min(tn, _round_up(n, 128)))


def visit_plan(group_sizes_G, first_group, num_local_groups: int, m_pad: int, tm: int, visit_empty: bool):
  """Static-length visit list: (group, m-tile) pairs in row order, plus how many are real.

  Returns (group_starts [G_local], group_ends [G_local], visit_group [V], visit_tile [V],
  num_visits scalar) with V = m_pad/tm + G_local (an upper bound on the real visits).
  """
  sizes = group_sizes_G.astype(jnp.int32)
  ends_all = jnp.cumsum(sizes)
  starts_all = ends_all - sizes
  local = first_group + jnp.arange(num_local_groups)
  starts, ends = starts_all[local], ends_all[local]
  local_sizes = ends - starts
  first_tile = starts // tm
  last_tile = jnp.maximum(ends - 1, starts) // tm
  tiles = jnp.where(local_sizes > 0, last_tile - first_tile + 1, 1 if visit_empty else 0)
  num_visits = jnp.sum(tiles)
  capacity = m_pad // tm + num_local_groups
  visit_group = jnp.repeat(jnp.arange(num_local_groups, dtype=jnp.int32), tiles, total_repeat_length=capacity)
  offsets = jnp.cumsum(tiles) - tiles
  within = jnp.arange(capacity, dtype=jnp.int32) - offsets[visit_group]
  visit_tile = jnp.clip(first_tile[visit_group] + within, 0, m_pad // tm - 1)
  # Padding visits (past num_visits) repeat the last real visit and are skipped in-kernel.
  last = jnp.maximum(num_visits - 1, 0)
  idx = jnp.minimum(jnp.arange(capacity), last)
  return starts, ends, visit_group[idx], visit_tile[idx].astype(jnp.int32), num_visits.astype(jnp.int32)


def _row_mask(tile, tm, start, end):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= start) & (rows < end)


def _gmm_kernel(starts_ref, ends_ref, vgroup_ref, vtile_ref, nvis_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm):
  i, kk = pl.program_id(1), pl.program_id(2)
  num_k = pl.num_programs(2)
  real = i < nvis_ref[0]

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real)
  def _():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[0], preferred_element_type=jnp.float32)

  @pl.when(real & (kk == num_k - 1))
  def _():
    g, tile = vgroup_ref[i], vtile_ref[i]
    masked = jnp.where(_row_mask(tile, tm, starts_ref[g], ends_ref[g]), acc_ref[...], 0.0)
    first_visit = (i == 0) | (vtile_ref[jnp.maximum(i - 1, 0)] != tile)

    @pl.when(first_visit)
    def _():
      out_ref[...] = masked.astype(out_ref.dtype)

    @pl.when(jnp.logical_not(first_visit))
    def _():
      out_ref[...] = (out_ref[...].astype(jnp.float32) + masked).astype(out_ref.dtype)


def _pad_to(x, shape):
  pads = [(0, t - s) for s, t in zip(x.shape, shape)]
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


@functools.partial(jax.jit, static_argnames=("num_groups_local", "out_dtype", "tiling", "interpret"))
def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, first_group, *, num_groups_local, out_dtype, tiling=None,
        interpret=False):
  """out[m, n]; rows of groups outside [first_group, first_group + num_groups_local) are zero."""
  m, k = lhs_MxK.shape
  n = rhs_GxKxN.shape[2]
  tm, tk, tn = tile_sizes(m, k, n, tiling)
  m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad_to(lhs_MxK, (m_pad, k_pad))
  rhs = _pad_to(rhs_GxKxN, (rhs_GxKxN.shape[0], k_pad, n_pad))
  starts, ends, vgroup, vtile, nvis = visit_plan(group_sizes_G, first_group, num_groups_local, m_pad, tm, False)
  num_visits = vtile.shape[0]
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=(m * k + num_groups_local * k * n) * itemsize + m * n * jnp.dtype(out_dtype).itemsize)
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(n_pad // tn, num_visits, k_pad // tk),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda j, i, kk, s, e, vg, vt, nv: (vt[i], kk)),
              pl.BlockSpec((1, tk, tn), lambda j, i, kk, s, e, vg, vt, nv: (vg[i], kk, j)),
          ],
          out_specs=pl.BlockSpec((tm, tn), lambda j, i, kk, s, e, vg, vt, nv: (vt[i], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost,
      interpret=pltpu.InterpretParams() if interpret else False,
  )(starts, ends, vgroup, vtile, nvis.reshape(1), lhs, rhs)
  rows = jnp.arange(m)[:, None]
  lo, hi = starts[0], ends[num_groups_local - 1]
  return jnp.where((rows >= lo) & (rows < hi), out[:m, :n], 0).astype(out_dtype)


def _tgmm_kernel(starts_ref, ends_ref, vgroup_ref, vtile_ref, nvis_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, tm):
  i = pl.program_id(2)
  num_v = pl.num_programs(2)
  real = i < nvis_ref[0]
  g, tile = vgroup_ref[i], vtile_ref[i]
  new_group = (i == 0) | (vgroup_ref[jnp.maximum(i - 1, 0)] != g)

  @pl.when(new_group)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real)
  def _():
    mask = _row_mask(tile, tm, starts_ref[g], ends_ref[g])
    lhs = jnp.where(mask, lhs_ref[...], jnp.zeros_like(lhs_ref[...]))
    acc_ref[...] += jax.lax.dot_general(lhs, grad_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  last_of_group = (i == num_v - 1) | (vgroup_ref[jnp.minimum(i + 1, num_v - 1)] != g) | (i + 1 >= nvis_ref[0])

  @pl.when(real & last_of_group)
  def _():
    out_ref[0] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups_local", "out_dtype", "tiling", "interpret"))
def tgmm(lhs_MxK, grad_MxN, group_sizes_G, first_group, *, num_groups_local, out_dtype, tiling=None,
         interpret=False):
  """out[g] = lhs[rows of g].T @ grad[rows of g] for the local groups: [G_local, k, n]."""
  m, k = lhs_MxK.shape
  n = grad_MxN.shape[1]
  tm, tk, tn = tile_sizes(m, k, n, tiling)
  m_pad, k_pad, n_pad = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
  lhs = _pad_to(lhs_MxK, (m_pad, k_pad))
  grad = _pad_to(grad_MxN, (m_pad, n_pad))
  starts, ends, vgroup, vtile, nvis = visit_plan(group_sizes_G, first_group, num_groups_local, m_pad, tm, True)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=(m * k + m * n) * itemsize + num_groups_local * k * n * jnp.dtype(out_dtype).itemsize)
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((num_groups_local, k_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(k_pad // tk, n_pad // tn, vtile.shape[0]),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda kk, j, i, s, e, vg, vt, nv: (vt[i], kk)),
              pl.BlockSpec((tm, tn), lambda kk, j, i, s, e, vg, vt, nv: (vt[i], j)),
          ],
          out_specs=pl.BlockSpec((1, tk, tn), lambda kk, j, i, s, e, vg, vt, nv: (vg[i], kk, j)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=pltpu.InterpretParams() if interpret else False,
  )(starts, ends, vgroup, vtile, nvis.reshape(1), lhs, grad)
  return out[:, :k, :n]
