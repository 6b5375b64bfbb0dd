"""Plain-XLA implementations of the MoE kernels: the semantics every backend must match, and
what runs on CPU (and, for the grouped matmul, on GPU under backend "auto").

Grouped matmul: on GPU and TPU, `lax.ragged_dot` (and its transpose for tgmm). On CPU,
`ragged_dot` is a dense masked loop over all groups (G times the FLOPs), so there the same
result is computed from row tiles instead: each (group, row tile) visit of gmm/plan.py
gathers its lhs tile and its group's weights, one batched einsum multiplies all visits, and the
tiles are summed back (FLOPs ~ (m + G * tile) * k * n; ~7-12x faster than `ragged_dot` at the
demo's sizes, fwd+bwd). `lax.platform_dependent` picks the formulation when lowering, so one
traced program is right on every platform; autodiff goes through either.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import plan

CPU_ROW_TILE = 128
CPU_GATHER_BYTES = 1 << 30  # above this, the tiled CPU form's gathered weights fall back to ragged_dot


def _local_sizes(sizes_G, first, local: int, m: int):
  """Sizes for ragged_dot over [rows before the local groups, local groups..., rows after],
  with zero weights for the outer two: rows of non-local groups come out zero."""
  ends_G = jnp.cumsum(sizes_G)
  start = jnp.where(first > 0, ends_G[jnp.maximum(first - 1, 0)], 0)
  local_L = jax.lax.dynamic_slice_in_dim(sizes_G, first, local)
  return jnp.concatenate([start[None], local_L, (m - start - jnp.sum(local_L))[None]]).astype(jnp.int32)


def _gmm_ragged(lhs_MxK, rhs_GxKxN, sizes_G, first, out_dtype, offset: bool):
  if offset:
    sizes_G = _local_sizes(sizes_G, first, rhs_GxKxN.shape[0], lhs_MxK.shape[0])
    zeros = jnp.zeros((1,) + rhs_GxKxN.shape[1:], rhs_GxKxN.dtype)
    rhs_GxKxN = jnp.concatenate([zeros, rhs_GxKxN, zeros])
  return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, sizes_G, preferred_element_type=out_dtype).astype(out_dtype)


def _visit_tiles(x_MxD, sizes_G, first, local: int, tm: int):
  """Row tiles of x per visit of the local groups, rows outside the visit's group zeroed:
  ([V, tm, D] tiles, [V] group, [V] tile)."""
  m = x_MxD.shape[0]
  m_tiles = -(-m // tm)
  starts_L, ends_L = plan.local_bounds(sizes_G, first, local)
  group_V, tile_V, count = plan.visits(starts_L, ends_L, m, tm, zero_tiles=False, empty_groups=False)
  g_V = jnp.maximum(group_V, 0)
  rows_VxT = tile_V[:, None] * tm + jnp.arange(tm)
  mine_VxT = ((jnp.arange(group_V.shape[0]) < count[0])[:, None]
              & (rows_VxT >= starts_L[g_V][:, None]) & (rows_VxT < ends_L[g_V][:, None]))
  x_tiles = jnp.pad(x_MxD, ((0, m_tiles * tm - m), (0, 0))).reshape(m_tiles, tm, -1)[tile_V]
  return jnp.where(mine_VxT[..., None], x_tiles, 0), g_V, tile_V


def _gmm_tiled(lhs_MxK, rhs_GxKxN, sizes_G, first, out_dtype, tm):
  m = lhs_MxK.shape[0]
  lhs_VxTxK, g_V, tile_V = _visit_tiles(lhs_MxK, sizes_G, first, rhs_GxKxN.shape[0], tm)
  out_VxTxN = jnp.einsum("vtk,vkn->vtn", lhs_VxTxK, rhs_GxKxN[g_V], preferred_element_type=jnp.float32)
  m_tiles, n = -(-m // tm), rhs_GxKxN.shape[2]
  out_TxTMxN = jnp.zeros((m_tiles, tm, n), jnp.float32).at[tile_V].add(out_VxTxN)
  return out_TxTMxN.reshape(m_tiles * tm, n)[:m].astype(out_dtype)


def _cpu_tiled_fits(m, k, n, groups, itemsize) -> bool:
  return (-(-m // CPU_ROW_TILE) + groups) * k * n * itemsize <= CPU_GATHER_BYTES


def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=None, group_offset=None):
  """Grouped matmul, equal to lax.ragged_dot: rows of lhs are sorted by group; rows past
  sum(group_sizes) are zero. With `group_offset`, rhs holds only groups [offset, offset +
  rhs.shape[0]) and the rows of every other group are zero."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  ragged = lambda a, b, s, f: _gmm_ragged(a, b, s, f, out_dtype, group_offset is not None)
  (m, k), (groups, _, n) = lhs_MxK.shape, rhs_GxKxN.shape
  if m == 0 or not _cpu_tiled_fits(m, k, n, groups, lhs_MxK.dtype.itemsize):
    return ragged(lhs_MxK, rhs_GxKxN, sizes_G, first)
  tiled = lambda a, b, s, f: _gmm_tiled(a, b, s, f, out_dtype, CPU_ROW_TILE)
  return jax.lax.platform_dependent(lhs_MxK, rhs_GxKxN, sizes_G, first, cpu=tiled, default=ragged)


def tgmm(lhs_MxK, grad_MxN, group_sizes_G, preferred_element_type=None, group_offset=None, num_groups=None):
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ grad[rows of g], for groups
  group_offset .. group_offset + num_groups - 1 (default all): [num_groups, k, n]."""
  sizes_G = group_sizes_G.astype(jnp.int32)
  out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
  first = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
  local = num_groups or sizes_G.shape[0]
  (m, k), n = lhs_MxK.shape, grad_MxN.shape[1]

  def ragged(a, g, s, f):  # the weight gradient of ragged_dot is exactly tgmm
    dtype = jnp.promote_types(a.dtype, out_dtype)
    a = a.astype(dtype)
    _, vjp = jax.vjp(lambda r: _gmm_ragged(a, r, s, f, jnp.float32, True), jnp.zeros((local, k, n), dtype))
    return vjp(g.astype(jnp.float32))[0].astype(out_dtype)

  def tiled(a, g, s, f):
    a_VxTxK, g_V, _ = _visit_tiles(a, s, f, local, CPU_ROW_TILE)
    g_VxTxN, _, _ = _visit_tiles(g, s, f, local, CPU_ROW_TILE)
    out_VxKxN = jnp.einsum("vtk,vtn->vkn", a_VxTxK, g_VxTxN, preferred_element_type=jnp.float32)
    return jnp.zeros((local, k, n), jnp.float32).at[g_V].add(out_VxKxN).astype(out_dtype)

  if m == 0 or not _cpu_tiled_fits(m, k, n, local, 4):
    return ragged(lhs_MxK, grad_MxN, sizes_G, first)
  return jax.lax.platform_dependent(lhs_MxK, grad_MxN, sizes_G, first, cpu=tiled, default=ragged)


def expert_choice(logits_GxNxE, capacity):
  """Each expert's top-`capacity` tokens per group; ties go to the lower token index."""
  scores_GxExC, token_idx_GxExC = jax.lax.top_k(jnp.swapaxes(logits_GxNxE, 1, 2), capacity)
  return token_idx_GxExC.astype(jnp.int32), scores_GxExC


def ec_dispatch(x_GxNxD, token_idx_GxExC):
  """Gathers each expert's chosen tokens: [G, E, C, D]."""
  return jax.vmap(lambda x_NxD, idx_ExC: x_NxD[idx_ExC])(x_GxNxD, token_idx_GxExC)


def ec_combine(y_GxExCxD, token_idx_GxExC, weights_GxExC, num_tokens):
  """Weighted scatter-add of expert outputs back to token positions: [G, N, D]."""
  def one_group(y_ExCxD, idx_ExC, w_ExC):
    contrib_ExCxD = y_ExCxD * w_ExC[..., None].astype(y_ExCxD.dtype)
    out_NxD = jnp.zeros((num_tokens, y_ExCxD.shape[-1]), y_ExCxD.dtype)
    return out_NxD.at[idx_ExC.reshape(-1)].add(contrib_ExCxD.reshape(-1, y_ExCxD.shape[-1]))
  return jax.vmap(one_group)(y_GxExCxD, token_idx_GxExC, weights_GxExC)
